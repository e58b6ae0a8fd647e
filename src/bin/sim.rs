//! Runs the deterministic simulator over many seeds.
//!
//! `sim --seeds N [--seed-start S] [--replicas 3|5] [--mode parallel|raft] [--soak]
//!      [--naive paper-merge|raft-truncation|unsafe-reads|lease-ignores-pauses] [--no-faults] [--membership] [--max-sync-bytes N] [--window N] [--batch] [--verbose]`
//!
//! `--window N` gives every replica an in-flight window of N entries instead of the span's
//! N + 1 (the default span is 2): clients keep up to 4 writes each outstanding, so with a wider
//! window followers also lack uncommitted entries more than the span below their last.
//!
//! `--batch` steps writes and acknowledgements as the servers do, leaving their commands for
//! the end of a short round (`SimConfig::batch_rounds`): one append then carries the round's
//! writes, and a heartbeat or any other event may fall inside a round.

use std::process::ExitCode;
use std::time::Instant;

use parallelraft::sim::{self, SimConfig};
use parallelraft::{Mode, NaiveFlags};

struct Args {
    seeds: u64,
    seed_start: u64,
    replicas: usize,
    mode: Mode,
    soak: bool,
    naive: NaiveFlags,
    faults: bool,
    membership: bool,
    max_sync_bytes: Option<u64>,
    window: Option<u64>,
    batch: bool,
    verbose: bool,
}

const USAGE: &str = "usage: sim --seeds N [--seed-start S] [--replicas 3|5] [--mode parallel|raft] [--soak] \
[--naive paper-merge|raft-truncation|unsafe-reads|lease-ignores-pauses] [--no-faults] [--membership] \
[--max-sync-bytes N] [--window N] [--batch] [--verbose]";

fn parse() -> Result<Args, String> {
    let mut args = Args {
        seeds: 100,
        seed_start: 0,
        replicas: 3,
        mode: Mode::Parallel,
        soak: false,
        naive: NaiveFlags::default(),
        faults: true,
        membership: false,
        max_sync_bytes: None,
        window: None,
        batch: false,
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--seeds" => args.seeds = value("--seeds")?.parse().map_err(|e| format!("--seeds: {e}"))?,
            "--seed-start" | "--seed" => {
                args.seed_start = value("--seed-start")?.parse().map_err(|e| format!("--seed-start: {e}"))?
            }
            "--replicas" => {
                args.replicas = value("--replicas")?.parse().map_err(|e| format!("--replicas: {e}"))?;
                if !(1..=7).contains(&args.replicas) {
                    return Err("--replicas must be between 1 and 7".into());
                }
            }
            "--mode" => args.mode = value("--mode")?.parse()?,
            "--soak" => args.soak = true,
            "--no-faults" => args.faults = false,
            "--membership" => args.membership = true,
            "--batch" => args.batch = true,
            "--max-sync-bytes" => {
                let bytes: u64 = value("--max-sync-bytes")?.parse().map_err(|e| format!("--max-sync-bytes: {e}"))?;
                if bytes == 0 {
                    return Err("--max-sync-bytes must be positive".into());
                }
                args.max_sync_bytes = Some(bytes);
            }
            "--window" => {
                let entries: u64 = value("--window")?.parse().map_err(|e| format!("--window: {e}"))?;
                if entries == 0 {
                    return Err("--window must be positive".into());
                }
                args.window = Some(entries);
            }
            "--verbose" => args.verbose = true,
            "--naive" => match value("--naive")?.as_str() {
                "paper-merge" => args.naive.paper_merge = true,
                "raft-truncation" => args.naive.raft_truncation = true,
                "unsafe-reads" => args.naive.unsafe_reads = true,
                "lease-ignores-pauses" => args.naive.lease_ignores_pauses = true,
                other => return Err(format!("unknown naive variant {other:?}")),
            },
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mode_name = match args.mode {
        Mode::Parallel => "parallel",
        Mode::Raft => "raft",
    };
    // A violation inside the core panics; report it as a failing seed, quietly.
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let (mut passed, mut failed) = (0u64, 0u64);
    for seed in args.seed_start..args.seed_start + args.seeds {
        let mut cfg = SimConfig::new(seed, args.replicas, args.mode);
        cfg.naive = args.naive;
        cfg.faults = args.faults;
        cfg.membership = args.membership;
        if let Some(bytes) = args.max_sync_bytes {
            cfg.max_sync_bytes = bytes;
        }
        cfg.in_flight_window = args.window;
        cfg.batch_rounds = args.batch;
        if args.soak {
            cfg = cfg.soak();
        }
        let result = std::panic::catch_unwind(|| sim::run(&cfg));
        let violations = match result {
            Ok(report) => {
                if args.verbose {
                    eprintln!("seed {seed}: {:?}", report.stats);
                }
                report.violations
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                vec![format!("panic: {msg}")]
            }
        };
        if violations.is_empty() {
            passed += 1;
        } else {
            failed += 1;
            println!("FAILED seed {seed} (replicas {}, mode {mode_name}):", args.replicas);
            for v in violations.iter().take(5) {
                println!("  {v}");
            }
            let mut replay = format!(
                "cargo run --release -p parallelraft --bin sim -- --seeds 1 --seed-start {seed} --replicas {} --mode {mode_name}",
                args.replicas
            );
            if args.soak {
                replay.push_str(" --soak");
            }
            if args.naive.paper_merge {
                replay.push_str(" --naive paper-merge");
            }
            if args.naive.raft_truncation {
                replay.push_str(" --naive raft-truncation");
            }
            if args.naive.unsafe_reads {
                replay.push_str(" --naive unsafe-reads");
            }
            if args.naive.lease_ignores_pauses {
                replay.push_str(" --naive lease-ignores-pauses");
            }
            if !args.faults {
                replay.push_str(" --no-faults");
            }
            if args.membership {
                replay.push_str(" --membership");
            }
            if let Some(bytes) = args.max_sync_bytes {
                replay.push_str(&format!(" --max-sync-bytes {bytes}"));
            }
            if let Some(entries) = args.window {
                replay.push_str(&format!(" --window {entries}"));
            }
            if args.batch {
                replay.push_str(" --batch");
            }
            println!("  replay: {replay}");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("{:.1} seeds/s ({} seeds in {:.1}s)", (passed + failed) as f64 / secs, passed + failed, secs);
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
