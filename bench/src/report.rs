//! The comparison table, the summary JSON and the benchmark goals of issue 5.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::fio::Measure;

/// Medians per (job, target).
pub type Results = BTreeMap<(String, String), Measure>;

/// The anchors ratios are taken against, in column order.
pub const ANCHORS: [&str; 3] = ["nbdkit-file", "nbdkit-memory", "local-disk"];

/// One row per (job, target): the medians (with the host's steal during the job, see
/// [`crate::host`]), then the IOPS ratio to each anchor measured for the same job (latency
/// ratios are in the goals below the table).
pub fn table(results: &Results, runs: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "medians of {runs} run(s); latencies are fio completion latencies in µs; steal%: the \
         machine's CPU time the host took during the job; cpu/op: µs of CPU the target's \
         processes spent per operation (all of the engine's; none of fio's); probe-cpu and \
         probe-sync: the host's speed just before the job, µs (a fixed piece of CPU work, and a \
         4 KiB write + fdatasync: higher is a slower host)"
    );
    let _ = write!(
        s,
        "{:<24} {:<18} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7} {:>9} {:>10}",
        "job", "target", "IOPS", "MiB/s", "mean", "p50", "p99", "p99.9", "steal%", "cpu/op", "probe-cpu", "probe-sync"
    );
    for a in ANCHORS {
        let _ = write!(s, " {:>14}", format!("x {a}"));
    }
    s.push('\n');
    for ((job, target), m) in results {
        let _ = write!(
            s,
            "{job:<24} {target:<18} {:>10.0} {:>9.1} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>6.0} {:>7.1} {:>9.0} {:>10.0}",
            m.iops,
            m.mib_s,
            m.mean_us,
            m.p50_us,
            m.p99_us,
            m.p999_us,
            m.steal_pct,
            m.cpu_us_per_op,
            m.cpu_probe_us,
            m.flush_probe_us
        );
        for a in ANCHORS {
            match results.get(&key(job, a)) {
                Some(anchor) if anchor.iops > 0.0 => {
                    let _ = write!(s, " {:>14.2}", m.iops / anchor.iops);
                }
                _ => {
                    let _ = write!(s, " {:>14}", "-");
                }
            }
        }
        s.push('\n');
    }
    s
}

/// Every run's measure per (job, target), in run order (runs are interleaved across targets,
/// so run k of two targets ran close together).
pub type PerRun = BTreeMap<(String, String), Vec<Measure>>;

/// The host probes, µs, taken right before one run's target job and its anchor job.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunProbes {
    pub target_cpu_us: f64,
    pub anchor_cpu_us: f64,
    pub target_sync_us: f64,
    pub anchor_sync_us: f64,
}

/// A benchmark goal: a ratio between two measured figures and the bound it should meet.
pub struct Goal {
    pub what: &'static str,
    /// Of the medians.
    pub ratio: Option<f64>,
    /// Of run k against run k, for each run both targets completed.
    pub per_run: Vec<f64>,
    /// The host probes before each of those runs' jobs (see [`crate::probe`]). Tells a run's
    /// ratio measured on a slow host (on one side) from one that was not.
    pub per_run_probes: Vec<RunProbes>,
    /// `true`: the ratio should be at least `bound`; `false`: at most.
    pub at_least: bool,
    pub bound: f64,
    /// The best ratio an engine of [`Goal::limit_scope`] could reach on this machine, from the
    /// same run's anchors (`None` where no such limit is measured), with how it was computed.
    pub limit: Option<(f64, String)>,
    /// Which engines the limit bounds: any keeping three durable copies on this disk, or only
    /// those of this engine's design.
    pub limit_scope: &'static str,
}

impl Goal {
    pub fn met(&self) -> Option<bool> {
        self.ratio.map(|r| self.meets(r))
    }

    fn meets(&self, ratio: f64) -> bool {
        if self.at_least {
            ratio >= self.bound
        } else {
            ratio <= self.bound
        }
    }

    /// `Some(false)`: even the limit misses the bound, so no engine could meet the goal in
    /// this run on this machine.
    pub fn reachable(&self) -> Option<bool> {
        self.limit.as_ref().map(|(l, _)| self.meets(*l))
    }
}

/// The key of (job, target) in [`Results`] and [`PerRun`].
fn key(job: &str, target: &str) -> (String, String) {
    (job.to_string(), target.to_string())
}

/// The IOPS-derived mean time of one operation of a job run at iodepth 1, µs.
fn cycle_us(m: &Measure) -> f64 {
    1e6 / m.iops
}

/// A limit no three-replica engine can pass here: the 4 KiB write at iodepth 1 needs at least
/// one NBD round trip (nbdkit-memory's p50: no storage at all) and one durable write on this
/// disk before it may answer (the local disk's write + fsync, one at a time), over
/// nbdkit-file's p50. An estimate (a sum of a median and a mean), not a bound on every write.
fn qd1_latency_limit(r: &Results) -> Option<(f64, String)> {
    let get = |job: &str, target: &str| r.get(&key(job, target));
    let round_trip = get("randwrite-4k-qd1", "nbdkit-memory")?.p50_us;
    let durable = cycle_us(get("durable-write-4k-qd1", "local-disk")?);
    let anchor = get("randwrite-4k-qd1", "nbdkit-file")?.p50_us;
    let limit = ratio(Some(round_trip + durable), Some(anchor))?;
    Some((
        limit,
        format!(
            "NBD round trip {round_trip:.0} µs (nbdkit-memory p50) + durable 4 KiB write {durable:.0} µs \
             (local disk, write + fsync) over nbdkit-file's {anchor:.0} µs"
        ),
    ))
}

/// A limit no three-replica engine can pass here: all three copies go to this one disk, so at
/// best a third of the local disk's sequential bandwidth, over nbdkit-memory's.
fn seq_write_limit(r: &Results) -> Option<(f64, String)> {
    let get = |target: &str| r.get(&key("seqwrite-128k-qd16", target)).map(|m| m.mib_s);
    let (disk, anchor) = (get("local-disk")?, get("nbdkit-memory")?);
    let limit = ratio(Some(disk / 3.0), Some(anchor))?;
    Some((limit, format!("local disk {disk:.0} MiB/s / 3 copies over nbdkit-memory's {anchor:.0} MiB/s")))
}

/// A limit for engines that, like this one, keep each block in place in every copy's block
/// store: each 4 KiB write reaches this disk as one random 4 KiB write per copy (overwrites of
/// a block between two checkpoints of its chunk are rare over the job's span), so at best a
/// third of the local disk's random-write IOPS at iodepth 32, over nbdkit-file's. An estimate
/// (the kernel writes the block stores back at a queue depth of its own), and generous:
/// the WAL's group commits, also requests to the same disk, are not counted. A log-structured
/// store, writing blocks sequentially, is not bounded by it.
fn randwrite_in_place_limit(r: &Results) -> Option<(f64, String)> {
    let get = |target: &str| r.get(&key("randwrite-4k-qd32", target)).map(|m| m.iops);
    let (disk, anchor) = (get("local-disk")?, get("nbdkit-file")?);
    let limit = ratio(Some(disk / 3.0), Some(anchor))?;
    Some((limit, format!("local disk {disk:.0} random 4 KiB writes/s / 3 copies over nbdkit-file's {anchor:.0} IOPS")))
}

/// [`Goal::limit_scope`] of the limits that hold for any design.
const ANY_ENGINE: &str = "any 3-replica engine";

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// What a goal compares: `field` of (job, target) over `field` of (job, anchor).
struct Spec {
    what: &'static str,
    job: &'static str,
    target: &'static str,
    anchor: &'static str,
    field: fn(&Measure) -> f64,
    at_least: bool,
    bound: f64,
    limit: Option<LimitSpec>,
}

/// How a goal's limit is computed from the run's medians (see [`Goal::limit`]), and which
/// engines it bounds ([`Goal::limit_scope`]).
struct LimitSpec {
    of: fn(&Results) -> Option<(f64, String)>,
    scope: &'static str,
}

const SPECS: [Spec; 7] = [
    Spec {
        what: "4k randwrite qd32 IOPS, parallel / nbdkit-file",
        job: "randwrite-4k-qd32",
        target: "parallel",
        anchor: "nbdkit-file",
        field: |m| m.iops,
        at_least: true,
        bound: 1.5,
        limit: Some(LimitSpec { of: randwrite_in_place_limit, scope: "a 3-replica in-place engine" }),
    },
    Spec {
        what: "4k randwrite qd1 p50 latency, parallel / nbdkit-file",
        job: "randwrite-4k-qd1",
        target: "parallel",
        anchor: "nbdkit-file",
        field: |m| m.p50_us,
        at_least: false,
        bound: 3.0,
        limit: Some(LimitSpec { of: qd1_latency_limit, scope: ANY_ENGINE }),
    },
    Spec {
        what: "4k randread qd32 IOPS, parallel / nbdkit-memory",
        job: "randread-4k-qd32",
        target: "parallel",
        anchor: "nbdkit-memory",
        field: |m| m.iops,
        at_least: true,
        bound: 0.7,
        limit: None,
    },
    Spec {
        what: "128k seq write MiB/s, parallel / nbdkit-memory",
        job: "seqwrite-128k-qd16",
        target: "parallel",
        anchor: "nbdkit-memory",
        field: |m| m.mib_s,
        at_least: true,
        bound: 0.5,
        limit: Some(LimitSpec { of: seq_write_limit, scope: ANY_ENGINE }),
    },
    Spec {
        what: "4k randwrite qd32 IOPS with jitter, parallel / raft",
        job: "randwrite-4k-qd32",
        target: "parallel-jitter",
        anchor: "raft-jitter",
        field: |m| m.iops,
        at_least: true,
        bound: 2.0,
        limit: None,
    },
    Spec {
        what: "4k randwrite qd32 IOPS with stragglers, parallel / raft",
        job: "randwrite-4k-qd32",
        target: "parallel-straggler",
        anchor: "raft-straggler",
        field: |m| m.iops,
        at_least: true,
        bound: 2.0,
        limit: None,
    },
    Spec {
        what: "4k randwrite qd32 IOPS without jitter, parallel / raft",
        job: "randwrite-4k-qd32",
        target: "parallel",
        anchor: "raft",
        field: |m| m.iops,
        at_least: true,
        bound: 0.95,
        limit: None,
    },
];

/// The goals of issue 5, from what was measured (a goal whose figures were not measured in
/// this run has no ratio).
pub fn goals(r: &Results, per_run: &PerRun) -> Vec<Goal> {
    SPECS
        .iter()
        .map(|s| {
            let median = |target: &str| r.get(&key(s.job, target)).map(s.field);
            let runs = |target: &str| per_run.get(&key(s.job, target)).map_or(&[][..], |v| v.as_slice());
            let (per_run, per_run_probes) = runs(s.target)
                .iter()
                .zip(runs(s.anchor))
                .filter_map(|(a, b)| {
                    let probes = RunProbes {
                        target_cpu_us: a.cpu_probe_us,
                        anchor_cpu_us: b.cpu_probe_us,
                        target_sync_us: a.flush_probe_us,
                        anchor_sync_us: b.flush_probe_us,
                    };
                    Some((ratio(Some((s.field)(a)), Some((s.field)(b)))?, probes))
                })
                .unzip();
            Goal {
                what: s.what,
                ratio: ratio(median(s.target), median(s.anchor)),
                per_run,
                per_run_probes,
                at_least: s.at_least,
                bound: s.bound,
                limit: s.limit.as_ref().and_then(|l| (l.of)(r)),
                limit_scope: s.limit.as_ref().map_or("", |l| l.scope),
            }
        })
        .collect()
}

pub fn goals_text(goals: &[Goal]) -> String {
    let mut s = String::from("goals (issue 5; reported, never asserted):\n");
    for g in goals {
        let bound = format!("{} {:.2}", if g.at_least { ">=" } else { "<=" }, g.bound);
        let (ratio, verdict) = match (g.ratio, g.met()) {
            (Some(r), Some(true)) => (format!("{r:.2}"), "met"),
            (Some(r), _) => (format!("{r:.2}"), "NOT met"),
            (None, _) => ("-".into(), "not measured"),
        };
        let runs = if g.per_run.len() > 1 {
            let each: Vec<String> = g.per_run.iter().map(|r| format!("{r:.2}")).collect();
            format!(" (per run {})", each.join(" / "))
        } else {
            String::new()
        };
        let _ = writeln!(s, "  {:<58} {:>8} (goal {bound}): {verdict}{runs}", g.what, ratio);
        let measured = |p: &RunProbes| {
            [p.target_cpu_us, p.anchor_cpu_us, p.target_sync_us, p.anchor_sync_us].iter().any(|v| v.is_finite())
        };
        if g.per_run.len() > 1 && g.per_run_probes.iter().any(measured) {
            let pair = |a: f64, b: f64| format!("{a:.0} / {b:.0}");
            let cpu: Vec<String> = g.per_run_probes.iter().map(|p| pair(p.target_cpu_us, p.anchor_cpu_us)).collect();
            let sync: Vec<String> = g.per_run_probes.iter().map(|p| pair(p.target_sync_us, p.anchor_sync_us)).collect();
            let _ = writeln!(
                s,
                "      host before each run, target / anchor: probe-cpu {} µs; probe-sync {} µs",
                cpu.join(", "),
                sync.join(", ")
            );
        }
        if let Some((limit, how)) = &g.limit {
            let verdict =
                if g.reachable() == Some(false) { "the goal is out of reach for it here" } else { "within its reach" };
            let _ = writeln!(
                s,
                "  {:<58} {:>8} ({how}): {verdict}",
                format!("  best {} could do here", g.limit_scope),
                format!("{limit:.2}")
            );
        }
    }
    s
}

/// The summary document: medians per job and target (with each run's IOPS and MiB/s), and
/// the goals (with each run's ratio).
pub fn summary_json(r: &Results, per_run: &PerRun, goals: &[Goal], runs: usize) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = r
        .iter()
        .map(|(key, m)| {
            let each = per_run.get(key).map_or(&[][..], |v| v.as_slice());
            serde_json::json!({
                "job": key.0, "target": key.1, "iops": m.iops, "mib_s": m.mib_s, "mean_us": m.mean_us,
                "p50_us": m.p50_us, "p99_us": m.p99_us, "p999_us": m.p999_us, "steal_pct": m.steal_pct,
                "cpu_us_per_op": m.cpu_us_per_op, "cpu_probe_us": m.cpu_probe_us,
                "flush_probe_us": m.flush_probe_us,
                "iops_runs": each.iter().map(|m| m.iops).collect::<Vec<_>>(),
                "mib_s_runs": each.iter().map(|m| m.mib_s).collect::<Vec<_>>(),
                // null where unknown (NaN is not JSON).
                "steal_pct_runs": each.iter().map(|m| m.steal_pct).collect::<Vec<_>>(),
                "cpu_us_per_op_runs": each.iter().map(|m| m.cpu_us_per_op).collect::<Vec<_>>(),
                "cpu_probe_us_runs": each.iter().map(|m| m.cpu_probe_us).collect::<Vec<_>>(),
                "flush_probe_us_runs": each.iter().map(|m| m.flush_probe_us).collect::<Vec<_>>(),
            })
        })
        .collect();
    let goals: Vec<serde_json::Value> = goals
        .iter()
        .map(|g| {
            serde_json::json!({"goal": g.what, "ratio": g.ratio, "per_run": g.per_run, "bound": g.bound,
                "at_least": g.at_least, "met": g.met(), "limit": g.limit.as_ref().map(|l| l.0),
                "limit_how": g.limit.as_ref().map(|l| l.1.clone()),
                "limit_scope": g.limit.as_ref().map(|_| g.limit_scope), "reachable": g.reachable()})
        })
        .collect();
    serde_json::json!({ "runs": runs, "results": rows, "goals": goals })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_to_the_anchor_of_the_same_job() {
        let mut r = Results::new();
        let m = |iops: f64, p50: f64| Measure { iops, p50_us: p50, ..Default::default() };
        r.insert(("randwrite-4k-qd32".into(), "parallel".into()), m(30_000.0, 900.0));
        r.insert(("randwrite-4k-qd32".into(), "nbdkit-file".into()), m(20_000.0, 1000.0));
        r.insert(("randwrite-4k-qd32".into(), "raft".into()), m(40_000.0, 1000.0));
        let t = table(&r, 1);
        assert!(t.contains("1.50"), "{t}");
        assert!(t.contains("steal%"), "{t}");
        let g = goals(&r, &PerRun::new());
        assert_eq!(g[0].ratio, Some(1.5));
        assert_eq!(g[0].met(), Some(true));
        assert_eq!(g[6].met(), Some(false), "parallel at 0.75x raft");
        assert_eq!(g[5].ratio, None, "no straggler targets ran");
        assert_eq!(g[1].ratio, None, "qd1 not measured");
        assert!(goals_text(&g).contains("not measured"));
        assert!(g.iter().all(|g| g.per_run.is_empty()));
    }

    #[test]
    fn limits_come_from_the_same_runs_anchors() {
        let mut r = Results::new();
        let put = |r: &mut Results, job: &str, target: &str, m: Measure| r.insert((job.into(), target.into()), m);
        let p50 = |p50_us: f64| Measure { p50_us, iops: 1.0, ..Default::default() };
        let bw = |mib_s: f64| Measure { mib_s, iops: 1.0, ..Default::default() };
        put(&mut r, "randwrite-4k-qd1", "parallel", p50(400.0));
        put(&mut r, "randwrite-4k-qd1", "nbdkit-file", p50(80.0));
        put(&mut r, "seqwrite-128k-qd16", "parallel", bw(200.0));
        put(&mut r, "seqwrite-128k-qd16", "nbdkit-memory", bw(2000.0));
        let g = goals(&r, &PerRun::new());
        assert!(g.iter().all(|g| g.limit.is_none()), "no limit without its anchors");
        assert_eq!(g[1].reachable(), None);
        // Round trip 40 µs + a durable write at 5,000 IOPS (200 µs) = 240 µs: 3x of 80 µs,
        // just within the goal's 3x.
        put(&mut r, "randwrite-4k-qd1", "nbdkit-memory", p50(40.0));
        put(&mut r, "durable-write-4k-qd1", "local-disk", Measure { iops: 5000.0, ..Default::default() });
        // A disk of 2,400 MiB/s: 800 MiB/s for each of three copies, 0.4x of nbdkit-memory.
        put(&mut r, "seqwrite-128k-qd16", "local-disk", bw(2400.0));
        // A disk taking 60,000 random 4 KiB writes a second: 20,000 for each of three copies
        // written in place, 1.25x of nbdkit-file's 16,000.
        let iops = |iops: f64| Measure { iops, ..Default::default() };
        put(&mut r, "randwrite-4k-qd32", "parallel", iops(8000.0));
        put(&mut r, "randwrite-4k-qd32", "nbdkit-file", iops(16000.0));
        put(&mut r, "randwrite-4k-qd32", "local-disk", iops(60000.0));
        let g = goals(&r, &PerRun::new());
        let (qd1, how) = g[1].limit.clone().unwrap();
        assert!((qd1 - 3.0).abs() < 1e-9, "{qd1}");
        assert!(how.contains("200 µs") && how.contains("40 µs"), "{how}");
        assert_eq!(g[1].reachable(), Some(true), "a limit equal to the bound can meet it");
        assert_eq!(g[1].met(), Some(false), "the engine itself at 5x");
        assert_eq!(g[3].limit.as_ref().map(|l| l.0), Some(0.4));
        assert_eq!(g[3].reachable(), Some(false));
        let (in_place, how) = g[0].limit.clone().unwrap();
        assert!((in_place - 1.25).abs() < 1e-9, "{in_place}");
        assert!(how.contains("60000") && how.contains("16000"), "{how}");
        assert_eq!(g[0].reachable(), Some(false), "1.25x cannot meet 1.5x");
        assert_eq!(g[0].limit_scope, "a 3-replica in-place engine");
        assert_eq!(g[1].limit_scope, ANY_ENGINE);
        assert!(g.iter().enumerate().all(|(i, g)| g.limit.is_some() == (i <= 1 || i == 3)));
        let text = goals_text(&g);
        assert!(text.contains("0.40 (local disk 2400 MiB/s / 3 copies") && text.contains("out of reach"), "{text}");
        assert!(
            text.contains("best a 3-replica in-place engine could do here") && text.contains("1.25 (local disk 60000")
        );
        assert!(text.contains("best any 3-replica engine could do here"), "{text}");
        let json = summary_json(&r, &PerRun::new(), &g, 1);
        assert_eq!(json["goals"][3]["reachable"], serde_json::json!(false));
        assert_eq!(json["goals"][0]["limit"], serde_json::json!(1.25));
        assert_eq!(json["goals"][0]["limit_scope"], serde_json::json!("a 3-replica in-place engine"));
        assert_eq!(json["goals"][2]["limit"], serde_json::Value::Null);
        assert_eq!(json["goals"][2]["limit_scope"], serde_json::Value::Null);
    }

    #[test]
    fn per_run_ratios_pair_run_k_with_run_k() {
        let m = |iops: f64| Measure { iops, ..Default::default() };
        let with_cpu = |iops: f64| Measure {
            iops,
            cpu_us_per_op: 5000.0 / iops,
            cpu_probe_us: 7000.0,
            flush_probe_us: 3.0 * iops,
            ..Default::default()
        };
        let mut per_run = PerRun::new();
        per_run.insert(
            ("randread-4k-qd32".into(), "parallel".into()),
            vec![with_cpu(50.0), with_cpu(40.0), with_cpu(62.5)],
        );
        per_run.insert(("randread-4k-qd32".into(), "nbdkit-memory".into()), vec![m(100.0), m(80.0), m(100.0)]);
        let medians: Results = per_run.iter().map(|(k, v)| (k.clone(), crate::fio::median(v))).collect();
        let g = goals(&medians, &per_run);
        assert_eq!(g[2].ratio, Some(0.5), "median 50 over median 100");
        assert_eq!(g[2].per_run, vec![0.5, 0.5, 0.625]);
        assert!(
            goals_text(&g).contains("0.50 (goal >= 0.70): NOT met (per run 0.50 / 0.50 / 0.62)"),
            "{}",
            goals_text(&g)
        );
        assert_eq!(
            g[2].per_run_probes[2],
            RunProbes { target_cpu_us: 7000.0, anchor_cpu_us: 0.0, target_sync_us: 187.5, anchor_sync_us: 0.0 },
            "target's, then the anchor's"
        );
        assert!(
            goals_text(&g).contains(
                "host before each run, target / anchor: probe-cpu 7000 / 0, 7000 / 0, 7000 / 0 µs; \
                 probe-sync 150 / 0, 120 / 0, 188 / 0 µs"
            ),
            "{}",
            goals_text(&g)
        );
        let json = summary_json(&medians, &per_run, &g, 3);
        assert_eq!(json["results"][1]["iops_runs"], serde_json::json!([50.0, 40.0, 62.5]), "{json}");
        assert_eq!(json["goals"][2]["per_run"], serde_json::json!([0.5, 0.5, 0.625]));
        assert_eq!(json["results"][1]["steal_pct_runs"], serde_json::json!([0.0, 0.0, 0.0]), "{json}");
        assert_eq!(json["results"][1]["cpu_us_per_op_runs"], serde_json::json!([100.0, 125.0, 80.0]), "{json}");
        assert_eq!(json["results"][1]["cpu_us_per_op"], serde_json::json!(100.0), "the median");
        let table = table(&medians, 3);
        let row = table.lines().find(|l| l.contains("parallel")).unwrap();
        assert!(table.contains("cpu/op") && row.contains(" 100.0"), "{table}");
        assert_eq!(json["results"][1]["flush_probe_us_runs"], serde_json::json!([150.0, 120.0, 187.5]), "{json}");
        assert_eq!(json["results"][1]["flush_probe_us"], serde_json::json!(150.0), "the median");
        assert!(table.contains("probe-sync") && row.contains(" 7000 ") && row.contains(" 150 "), "{row}");
    }
}
