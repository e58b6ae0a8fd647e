//! The comparison table, the summary JSON and the benchmark goals of issue 5.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::fio::Measure;

/// Medians per (job, target).
pub type Results = BTreeMap<(String, String), Measure>;

/// The anchors ratios are taken against, in column order.
pub const ANCHORS: [&str; 3] = ["nbdkit-file", "nbdkit-memory", "local-disk"];

/// One row per (job, target): the medians, then the IOPS ratio to each anchor measured for the
/// same job (latency ratios are in the goals below the table).
pub fn table(results: &Results, runs: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "medians of {runs} run(s); latencies are fio completion latencies in µs");
    let _ = write!(
        s,
        "{:<24} {:<18} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "job", "target", "IOPS", "MiB/s", "mean", "p50", "p99", "p99.9"
    );
    for a in ANCHORS {
        let _ = write!(s, " {:>14}", format!("x {a}"));
    }
    s.push('\n');
    for ((job, target), m) in results {
        let _ = write!(
            s,
            "{job:<24} {target:<18} {:>10.0} {:>9.1} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
            m.iops, m.mib_s, m.mean_us, m.p50_us, m.p99_us, m.p999_us
        );
        for a in ANCHORS {
            match results.get(&(job.clone(), a.to_string())) {
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

/// A benchmark goal: a ratio between two measured figures and the bound it should meet.
pub struct Goal {
    pub what: &'static str,
    pub ratio: Option<f64>,
    /// `true`: the ratio should be at least `bound`; `false`: at most.
    pub at_least: bool,
    pub bound: f64,
}

impl Goal {
    pub fn met(&self) -> Option<bool> {
        self.ratio.map(|r| if self.at_least { r >= self.bound } else { r <= self.bound })
    }
}

fn get<'a>(r: &'a Results, job: &str, target: &str) -> Option<&'a Measure> {
    r.get(&(job.to_string(), target.to_string()))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// The goals of issue 5, from what was measured (a goal whose figures were not measured in
/// this run has no ratio).
pub fn goals(r: &Results) -> Vec<Goal> {
    let iops = |job: &str, t: &str| get(r, job, t).map(|m| m.iops);
    let p50 = |job: &str, t: &str| get(r, job, t).map(|m| m.p50_us);
    let mib = |job: &str, t: &str| get(r, job, t).map(|m| m.mib_s);
    vec![
        Goal {
            what: "4k randwrite qd32 IOPS, parallel / nbdkit-file",
            ratio: ratio(iops("randwrite-4k-qd32", "parallel"), iops("randwrite-4k-qd32", "nbdkit-file")),
            at_least: true,
            bound: 1.5,
        },
        Goal {
            what: "4k randwrite qd1 p50 latency, parallel / nbdkit-file",
            ratio: ratio(p50("randwrite-4k-qd1", "parallel"), p50("randwrite-4k-qd1", "nbdkit-file")),
            at_least: false,
            bound: 3.0,
        },
        Goal {
            what: "4k randread qd32 IOPS, parallel / nbdkit-memory",
            ratio: ratio(iops("randread-4k-qd32", "parallel"), iops("randread-4k-qd32", "nbdkit-memory")),
            at_least: true,
            bound: 0.7,
        },
        Goal {
            what: "128k seq write MiB/s, parallel / nbdkit-memory",
            ratio: ratio(mib("seqwrite-128k-qd16", "parallel"), mib("seqwrite-128k-qd16", "nbdkit-memory")),
            at_least: true,
            bound: 0.5,
        },
        Goal {
            what: "4k randwrite qd32 IOPS with jitter, parallel / raft",
            ratio: ratio(iops("randwrite-4k-qd32", "parallel-jitter"), iops("randwrite-4k-qd32", "raft-jitter")),
            at_least: true,
            bound: 2.0,
        },
        Goal {
            what: "4k randwrite qd32 IOPS with stragglers, parallel / raft",
            ratio: ratio(iops("randwrite-4k-qd32", "parallel-straggler"), iops("randwrite-4k-qd32", "raft-straggler")),
            at_least: true,
            bound: 2.0,
        },
        Goal {
            what: "4k randwrite qd32 IOPS without jitter, parallel / raft",
            ratio: ratio(iops("randwrite-4k-qd32", "parallel"), iops("randwrite-4k-qd32", "raft")),
            at_least: true,
            bound: 0.95,
        },
    ]
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
        let _ = writeln!(s, "  {:<58} {:>8} (goal {bound}): {verdict}", g.what, ratio);
    }
    s
}

/// The summary document: medians per job and target, and the goals.
pub fn summary_json(r: &Results, goals: &[Goal], runs: usize) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = r
        .iter()
        .map(|((job, target), m)| {
            serde_json::json!({
                "job": job, "target": target, "iops": m.iops, "mib_s": m.mib_s, "mean_us": m.mean_us,
                "p50_us": m.p50_us, "p99_us": m.p99_us, "p999_us": m.p999_us,
            })
        })
        .collect();
    let goals: Vec<serde_json::Value> = goals
        .iter()
        .map(|g| serde_json::json!({"goal": g.what, "ratio": g.ratio, "bound": g.bound, "at_least": g.at_least, "met": g.met()}))
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
        let g = goals(&r);
        assert_eq!(g[0].ratio, Some(1.5));
        assert_eq!(g[0].met(), Some(true));
        assert_eq!(g[6].met(), Some(false), "parallel at 0.75x raft");
        assert_eq!(g[5].ratio, None, "no straggler targets ran");
        assert_eq!(g[1].ratio, None, "qd1 not measured");
        assert!(goals_text(&g).contains("not measured"));
    }
}
