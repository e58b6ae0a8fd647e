//! ParallelRaft against classic Raft in the deterministic simulator's perf model (see
//! `parallelraft::sim::perf`): the protocol alone, without CPU, as the client's depth grows,
//! with no delays beyond a fixed hop, with uniform jitter between replicas and with stragglers.
//!
//! `sim-perf [--ops N] [--seed S] [--depths 1,8,16,32] [--window N] [--batch]` (`--window`: the
//! leader's in-flight window in entries, the chunk servers' by default; `--batch`: rounds as the
//! servers run them, a round's writes in one append per follower)

use std::process::ExitCode;

use parallelraft::sim::perf::{measure, PerfModel};
use parallelraft::Mode;

/// How a delay shape turns the plain model into its own.
type Shape = fn(PerfModel) -> PerfModel;

const USAGE: &str = "usage: sim-perf [--ops N] [--seed S] [--depths 1,8,16,32] [--window N] [--batch]";

struct Args {
    ops: u64,
    seed: u64,
    depths: Vec<usize>,
    window: u64,
    batch: bool,
}

fn parse() -> Result<Args, String> {
    let (mut ops, mut seed, mut depths) = (4000u64, 1u64, vec![1usize, 8, 16, 32]);
    let mut window = parallelraft::sim::perf::SERVER_WINDOW;
    let mut batch = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--ops" => ops = value("--ops")?.parse().map_err(|e| format!("--ops: {e}"))?,
            "--seed" => seed = value("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--depths" => {
                depths = value("--depths")?
                    .split(',')
                    .map(|d| d.parse::<usize>().map_err(|e| format!("--depths: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--window" => window = value("--window")?.parse().map_err(|e| format!("--window: {e}"))?,
            "--batch" => batch = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if ops < 100 {
        return Err("--ops must be at least 100".into());
    }
    if depths.is_empty() || depths.iter().any(|d| !(1..=256).contains(d)) {
        return Err("--depths must be between 1 and 256".into());
    }
    if window == 0 {
        return Err("--window must be positive".into());
    }
    Ok(Args { ops, seed, depths, window, batch })
}

fn main() -> ExitCode {
    let Args { ops, seed, depths, window, batch } = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{:<12} {:>5} {:>22} {:>22} {:>8} {:>9}",
        "delays", "depth", "parallel iops p50/p99", "raft iops p50/p99", "ratio", "snapshots"
    );
    let shapes: [(&str, Shape); 3] =
        [("none", |m| m), ("jitter", PerfModel::with_jitter), ("stragglers", PerfModel::with_stragglers)];
    for (name, shape) in shapes {
        for &depth in &depths {
            let plain = PerfModel::new(depth).with_window(window);
            let model = shape(if batch { plain.with_batching() } else { plain });
            let run = |mode| measure(mode, model, ops, seed);
            match (run(Mode::Parallel), run(Mode::Raft)) {
                (Ok(p), Ok(r)) => println!(
                    "{name:<12} {depth:>5} {:>9.0} {:>5}/{:<6} {:>9.0} {:>5}/{:<6} {:>7.2}x {:>4}/{:<4}",
                    p.iops,
                    p.p50_us,
                    p.p99_us,
                    r.iops,
                    r.p50_us,
                    r.p99_us,
                    p.iops / r.iops,
                    p.snapshots,
                    r.snapshots
                ),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("{name} depth {depth}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
