//! `bench compare`: the engine against its anchors, in one interleaved run.
//!
//! ```text
//! cargo run --release -p bench -- compare [--quick] [--out DIR] [--targets ...] [--jobs ...]
//! ```
//! Every run starts each target afresh, fills the measured range once, runs every job on it,
//! and stops it; runs are interleaved (run 1 of every target, then run 2, ...) so that a noisy
//! minute of the shared host does not land on one target. The fill comes first whichever jobs
//! were chosen: reads never read holes, and a job measures the same state alone (`--jobs`) as
//! in a full run (`nbdkit file` took 4 KiB random writes at 90-115k IOPS into a fresh sparse
//! file, at 16k while the kernel wrote a fill back).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bench::fio::{self, JobSettings, Measure};
use bench::host::{self, CpuTimes};
use bench::plot::{self, Series};
use bench::probe;
use bench::report::{self, Results};
use bench::targets::{Kind, Running, Target};
use chunkserver::server::transport::Jitter;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmarks of the ParallelRaft engine against its anchors")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the fio jobs against the engine (ParallelRaft and Raft mode, with and without
    /// jitter), nbdkit memory, nbdkit file and the local disk; print and save the comparison.
    Compare {
        /// A few minutes: one run of 3 s per job over 128 MiB, iodepths 1/4/16/32.
        #[arg(long)]
        quick: bool,
        /// Where fio's JSON, summary.json, table.txt and the plots go.
        #[arg(long, default_value = "bench-out")]
        out: PathBuf,
        /// Runs per job (medians are reported); default 3, 1 with --quick.
        #[arg(long)]
        runs: Option<usize>,
        /// Seconds per time-based job; default 10, 3 with --quick.
        #[arg(long)]
        runtime: Option<u32>,
        /// Message jitter of the `-jitter` engine targets: each message between chunk servers
        /// is held a random 0..=N µs.
        #[arg(long, default_value_t = 2000)]
        jitter_us: u64,
        /// Stragglers of the `-straggler` engine targets: one message in 1000/K (K is
        /// --straggler-per-mille) is held this long, µs; the others are not delayed.
        #[arg(long, default_value_t = 20_000)]
        straggler_us: u64,
        /// How many messages in 1000 the `-straggler` targets hold.
        #[arg(long, default_value_t = 20)]
        straggler_per_mille: u32,
        /// Look-behind span N of the engine targets.
        #[arg(long, default_value_t = chunkserver::server::DEFAULT_LBB_SPAN)]
        lbb_span: usize,
        /// In-flight window of the engine targets' chunk leaders, entries (`chunkserver
        /// --window`).
        #[arg(long, default_value_t = chunkserver::server::DEFAULT_WINDOW)]
        window: u64,
        /// Only these targets (comma-separated): parallel, raft, parallel-jitter, raft-jitter,
        /// parallel-straggler, raft-straggler, nbdkit-memory, nbdkit-file, local-disk.
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        /// Only these jobs (comma-separated, as the table names them, e.g. randread-4k-qd32);
        /// a target that runs none of them is skipped.
        #[arg(long, value_delimiter = ',')]
        jobs: Vec<String>,
        /// Directory for the targets' data (the local-disk file lives here).
        #[arg(long)]
        work: Option<PathBuf>,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

/// One fio job of the plan: a job file, optionally at another iodepth.
#[derive(Clone, Debug)]
struct Job {
    /// Name in the results (the file name, or `randwrite-4k-qdN` for the sweep).
    name: String,
    file: &'static str,
    iodepth: Option<u32>,
}

impl Job {
    fn file(name: &'static str) -> Job {
        Job { name: name.into(), file: name, iodepth: None }
    }

    fn sweep(depth: u32) -> Job {
        match depth {
            1 => Job::file("randwrite-4k-qd1"),
            32 => Job::file("randwrite-4k-qd32"),
            d => Job { name: format!("randwrite-4k-qd{d}"), file: "randwrite-4k-qd1", iodepth: Some(d) },
        }
    }
}

/// The delays of the engine targets' messages: uniform jitter, and rare stragglers.
#[derive(Clone, Copy, Debug)]
struct Delays {
    jitter: Jitter,
    straggler: Jitter,
}

fn all_targets(delays: Delays, lbb_span: usize, window: u64) -> Vec<Target> {
    let engine = |name: &str, mode: &str, jitter: Jitter| Target {
        name: name.into(),
        kind: Kind::Engine { mode: mode.into(), jitter, lbb_span, window },
    };
    vec![
        engine("parallel", "parallel", Jitter::default()),
        engine("raft", "raft", Jitter::default()),
        engine("parallel-jitter", "parallel", delays.jitter),
        engine("raft-jitter", "raft", delays.jitter),
        engine("parallel-straggler", "parallel", delays.straggler),
        engine("raft-straggler", "raft", delays.straggler),
        Target { name: "nbdkit-memory".into(), kind: Kind::NbdkitMemory },
        Target { name: "nbdkit-file".into(), kind: Kind::NbdkitFile },
        Target { name: "local-disk".into(), kind: Kind::LocalDisk },
    ]
}

/// The jobs each target runs: the delayed targets only the iodepth sweep; the other engine
/// targets the common jobs and the sweep; the anchors the common jobs.
fn plan(target: &Target, quick: bool) -> Vec<Job> {
    let depths: &[u32] = if quick { &[1, 4, 16, 32] } else { &[1, 2, 4, 8, 16, 32] };
    // durable-write-4k-qd1 (a flush after every write): nbdkit file's is the durable
    // single-copy anchor, and the local disk's gives the goals' limits (report::goals).
    let mut common: Vec<Job> =
        ["randwrite-4k-qd1", "randwrite-4k-qd32", "randread-4k-qd32", "seqwrite-128k-qd16", "durable-write-4k-qd1"]
            .map(Job::file)
            .to_vec();
    if !quick {
        common.extend(["randread-4k-qd1", "seqread-128k-qd16", "mixed-70-30", "multi-conn-4"].map(Job::file));
    }
    let sweep = || depths.iter().map(|d| Job::sweep(*d));
    let delayed = target.name.ends_with("-jitter") || target.name.ends_with("-straggler");
    let mut jobs = match (&target.kind, delayed) {
        (Kind::Engine { .. }, true) => sweep().collect(),
        (Kind::Engine { .. }, false) => common.into_iter().chain(sweep()).collect::<Vec<Job>>(),
        _ => common,
    };
    let mut seen = std::collections::HashSet::new();
    jobs.retain(|j| seen.insert(j.name.clone()));
    jobs
}

/// `target`'s plan narrowed to `wanted` (all of it when `wanted` is empty).
fn select(target: &Target, quick: bool, wanted: &[String]) -> Vec<Job> {
    let mut jobs = plan(target, quick);
    if !wanted.is_empty() {
        jobs.retain(|j| wanted.contains(&j.name));
    }
    jobs
}

/// Fails on a wanted job that no chosen target runs (a typo would otherwise measure nothing).
fn check_jobs(chosen: &[Target], quick: bool, wanted: &[String]) -> Result<(), String> {
    let known: std::collections::BTreeSet<String> =
        chosen.iter().flat_map(|t| plan(t, quick)).map(|j| j.name).collect();
    match wanted.iter().find(|w| !known.contains(*w)) {
        Some(w) => Err(format!(
            "no chosen target runs job {w} (they run: {})",
            known.into_iter().collect::<Vec<_>>().join(", ")
        )),
        None => Ok(()),
    }
}

/// Builds the engine binary (when run through cargo) and returns its path.
fn chunkserver_binary() -> Result<PathBuf, String> {
    if let Ok(cargo) = std::env::var("CARGO") {
        let status = Command::new(cargo)
            .args(["build", "--release", "-q", "-p", "chunkserver", "--bin", "chunkserver"])
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("building chunkserver failed".into());
        }
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("chunkserver");
    if !bin.exists() {
        return Err(format!("{} not found: cargo build --release -p chunkserver", bin.display()));
    }
    Ok(bin)
}

fn require(tool: &str, package: &str) -> Result<(), String> {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map_err(|e| e.to_string())?;
    if !found.status.success() {
        return Err(format!("{tool} not found (apt install {package})"));
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    let Cmd::Compare {
        quick,
        out,
        runs,
        runtime,
        jitter_us,
        straggler_us,
        straggler_per_mille,
        lbb_span,
        window,
        targets,
        jobs: wanted_jobs,
        work,
    } = cli.command;
    let delays =
        Delays { jitter: Jitter::new(jitter_us, 0, 0)?, straggler: Jitter::new(0, straggler_us, straggler_per_mille)? };
    require("fio", "fio")?;
    require("nbdkit", "nbdkit")?;
    require("nbdinfo", "libnbd-bin")?;
    let runs = runs.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let settings = |iodepth| JobSettings {
        runtime_s: runtime.unwrap_or(if quick { 3 } else { 10 }),
        ramp_s: if quick { 1 } else { 2 },
        size: if quick { "128m".into() } else { "512m".into() },
        iodepth,
    };
    if window == 0 {
        return Err("--window must be positive".into());
    }
    let mut chosen = all_targets(delays, lbb_span, window);
    if !targets.is_empty() {
        for t in &targets {
            if !chosen.iter().any(|c| &c.name == t) {
                return Err(format!("unknown target {t}"));
            }
        }
        chosen.retain(|c| targets.contains(&c.name));
    }
    check_jobs(&chosen, quick, &wanted_jobs)?;
    chosen.retain(|t| !select(t, quick, &wanted_jobs).is_empty());
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fio-configs");
    let chunkserver = chunkserver_binary()?;
    let work = work.unwrap_or_else(std::env::temp_dir);
    for dir in [out.join("raw"), out.join("jobs")] {
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let started = Instant::now();
    let mut measured: BTreeMap<(String, String), Vec<Measure>> = BTreeMap::new();
    for r in 1..=runs {
        for target in &chosen {
            let jobs = select(target, quick, &wanted_jobs);
            eprintln!(
                "run {r}/{runs}: {} ({} jobs) at {:.0} s",
                target.name,
                jobs.len(),
                started.elapsed().as_secs_f64()
            );
            let running = Running::start(target, &work, &chunkserver)?;
            let text = fio::job_text(&configs, "prep-fill", &running.endpoint, &settings(None))?;
            let path = out.join("jobs").join(format!("{}-prep-fill.fio", target.name));
            std::fs::write(&path, text).map_err(|e| e.to_string())?;
            fio::run(&path, &out.join("raw").join(format!("{}-prep-fill-r{r}.json", target.name)))?;
            for job in jobs {
                let text = fio::job_text(&configs, job.file, &running.endpoint, &settings(job.iodepth))?;
                let path = out.join("jobs").join(format!("{}-{}.fio", target.name, job.name));
                std::fs::write(&path, text).map_err(|e| e.to_string())?;
                let speed = probe::probe(&work);
                let before = CpuTimes::now();
                let cpu_before = running.pid().and_then(host::tree_cpu_seconds);
                let wall = Instant::now();
                let doc = fio::run(&path, &out.join("raw").join(format!("{}-{}-r{r}.json", target.name, job.name)))?;
                let wall_s = wall.elapsed().as_secs_f64();
                let cpu_s = cpu_before.zip(running.pid().and_then(host::tree_cpu_seconds)).map(|(b, a)| a - b);
                let mut m = fio::measure(&doc).map_err(|e| format!("{} {}: {e}", target.name, job.name))?;
                m.steal_pct = before.zip(CpuTimes::now()).map_or(f64::NAN, |(b, a)| b.steal_pct(&a));
                m.cpu_us_per_op = host::cpu_us_per_op(cpu_s, wall_s, m.iops);
                (m.cpu_probe_us, m.flush_probe_us) = (speed.cpu_us, speed.flush_us);
                eprintln!(
                    "  {:<22} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>7.0} µs  p99 {:>7.0} µs  steal {:>3.0}%  cpu {:>5.0} µs/op  \
                     probe: cpu {:>6.0} µs, flush {:>5.0} µs",
                    job.name,
                    m.iops,
                    m.mib_s,
                    m.p50_us,
                    m.p99_us,
                    m.steal_pct,
                    m.cpu_us_per_op,
                    m.cpu_probe_us,
                    m.flush_probe_us
                );
                measured.entry((job.name.clone(), target.name.clone())).or_default().push(m);
            }
            if !running.metrics.is_empty() {
                save_profile(&running, &out, &format!("{}-r{r}", target.name));
            }
            drop(running);
        }
    }
    let results: Results = measured.iter().map(|(k, v)| (k.clone(), fio::median(v))).collect();
    let table = report::table(&results, runs);
    let goals = report::goals(&results, &measured);
    let goals_text = report::goals_text(&goals);
    println!("{table}\n{goals_text}");
    let write = |name: &str, text: String| {
        std::fs::write(out.join(name), text).map_err(|e| format!("cannot write {name}: {e}"))
    };
    write("table.txt", format!("{table}\n{goals_text}"))?;
    let summary = report::summary_json(&results, &measured, &goals, runs);
    write("summary.json", serde_json::to_string_pretty(&summary).unwrap())?;
    // Figure 7 of the paper: 4k random writes against iodepth, both modes.
    let depth_of = |job: &str| job.strip_prefix("randwrite-4k-qd").and_then(|d| d.parse::<f64>().ok());
    let series = |value: fn(&Measure) -> f64| -> Vec<Series> {
        chosen
            .iter()
            .filter(|t| t.is_engine())
            .map(|t| {
                let mut points: Vec<(f64, f64)> = results
                    .iter()
                    .filter(|((_, target), _)| *target == t.name)
                    .filter_map(|((job, _), m)| Some((depth_of(job)?, value(m))))
                    .collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series { name: t.name.clone(), points }
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    write("iops-vs-iodepth.svg", plot::svg("4 KiB random writes: IOPS", "iodepth", "IOPS", &series(|m| m.iops)))?;
    write(
        "latency-vs-iodepth.svg",
        plot::svg("4 KiB random writes: p50 latency", "iodepth", "p50 latency (µs)", &series(|m| m.p50_us)),
    )?;
    eprintln!("wrote {} in {:.0} s", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Saves the engine's `/metrics` and its stage breakdown (table and picture) after a target's
/// jobs: where the time of its writes went during this run.
fn save_profile(running: &Running, out: &Path, tag: &str) {
    let dir = out.join("profile");
    let _ = std::fs::create_dir_all(&dir);
    // The text is rendered every 500 ms: let it include the last job.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let mut all = Vec::new();
    // Whether the figures came from three replicas in step: a follower caught up from the block
    // image (a rebuild) during the run left the group writing two copies meanwhile.
    let (mut rebuilt, mut held) = (0.0, 0.0);
    for (k, addr) in running.metrics.iter().enumerate() {
        let who = if k == 0 { "frontend".to_string() } else { format!("server-{k}") };
        match chunkserver::profile::fetch(addr) {
            Ok(text) => {
                let _ = std::fs::write(dir.join(format!("{tag}-{who}.metrics.txt")), &text);
                rebuilt += chunkserver::metrics::sum_of(&text, "rebuild_sent_bytes_total");
                held += chunkserver::metrics::sum_of(&text, "proposals_held_by_lag");
                all.push((who, chunkserver::metrics::parse_stages(&text)));
            }
            Err(e) => eprintln!("  no metrics from {who}: {e}"),
        }
    }
    eprintln!("  replicas: {rebuilt:.0} bytes sent as rebuilds, {held:.0} writes held for a lagging follower");
    if !all.is_empty() {
        let _ = std::fs::write(dir.join(format!("{tag}.txt")), chunkserver::profile::table(&all));
        let _ = std::fs::write(dir.join(format!("{tag}.svg")), chunkserver::profile::svg(&all));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_the_sweep_once_and_only_engines_sweep() {
        let delays = Delays {
            jitter: Jitter { uniform_us: 2000, ..Jitter::default() },
            straggler: Jitter { uniform_us: 0, straggler_us: 20_000, straggler_per_mille: 20 },
        };
        let targets = all_targets(delays, 2, 3);
        let names = |t: &Target, quick| plan(t, quick).into_iter().map(|j| j.name).collect::<Vec<_>>();
        let parallel = names(&targets[0], true);
        assert_eq!(
            parallel,
            [
                "randwrite-4k-qd1",
                "randwrite-4k-qd32",
                "randread-4k-qd32",
                "seqwrite-128k-qd16",
                "durable-write-4k-qd1",
                "randwrite-4k-qd4",
                "randwrite-4k-qd16"
            ]
        );
        assert_eq!(
            names(&targets[2], true),
            ["randwrite-4k-qd1", "randwrite-4k-qd4", "randwrite-4k-qd16", "randwrite-4k-qd32"]
        );
        assert_eq!(names(&targets[4], true), names(&targets[2], true), "the straggler targets sweep too");
        assert_eq!(names(&targets[6], true).len(), 5, "anchors run the common jobs only");
        assert_eq!(names(&targets[8], false).len(), 9);
        assert!(plan(&targets[0], false).iter().any(|j| j.name == "randwrite-4k-qd8" && j.iodepth == Some(8)));
    }

    #[test]
    fn a_job_filter_narrows_plans_and_refuses_unknown_names() {
        let targets = all_targets(Delays { jitter: Jitter::default(), straggler: Jitter::default() }, 2, 3);
        let wanted = vec!["randread-4k-qd32".to_string()];
        let names = |t: &Target| select(t, false, &wanted).into_iter().map(|j| j.name).collect::<Vec<_>>();
        assert_eq!(names(&targets[0]), ["randread-4k-qd32"]);
        assert!(names(&targets[2]).is_empty(), "the delayed targets only sweep writes");
        assert_eq!(select(&targets[0], false, &[]).len(), plan(&targets[0], false).len(), "no filter: everything");
        assert!(check_jobs(&targets, false, &wanted).is_ok());
        let e = check_jobs(&targets, false, &["randread-4k-qd64".to_string()]).unwrap_err();
        assert!(e.contains("randread-4k-qd64") && e.contains("randread-4k-qd32"), "{e}");
        // A sweep job exists only where a chosen target sweeps.
        let anchors = &targets[6..];
        assert!(check_jobs(anchors, false, &["randwrite-4k-qd8".to_string()]).is_err());
    }
}
