//! fio jobs: taken from `fio-configs/`, adapted to a target, run, and their JSON read back.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where fio sends the I/O.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// An NBD export, through fio's nbd engine (libnbd).
    Nbd { uri: String },
    /// A file on the local disk, through io_uring with O_DIRECT.
    File { path: PathBuf },
}

/// How a job file is adapted for one run.
#[derive(Clone, Debug)]
pub struct JobSettings {
    pub runtime_s: u32,
    pub ramp_s: u32,
    pub size: String,
    /// Replaces the file's `iodepth` (the iodepth sweep).
    pub iodepth: Option<u32>,
}

/// The job file `name` of `configs` rewritten for `endpoint` and `settings`.
pub fn job_text(configs: &Path, name: &str, endpoint: &Endpoint, settings: &JobSettings) -> Result<String, String> {
    let path = configs.join(format!("{name}.fio"));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        let replaced = match key {
            "ioengine" => match endpoint {
                Endpoint::Nbd { .. } => Some("ioengine=nbd".to_string()),
                Endpoint::File { path } => Some(format!("ioengine=io_uring\ndirect=1\nfilename={}", path.display())),
            },
            "uri" => match endpoint {
                Endpoint::Nbd { uri } => Some(format!("uri={uri}")),
                Endpoint::File { .. } => Some(String::new()),
            },
            // Only the global defaults: a job that is not time based keeps its own zeroes.
            "runtime" if line.trim() == "runtime=30" => Some(format!("runtime={}", settings.runtime_s)),
            "ramp_time" if line.trim() == "ramp_time=2" => Some(format!("ramp_time={}", settings.ramp_s)),
            "size" if line.trim() == "size=512m" => Some(format!("size={}", settings.size)),
            "iodepth" => settings.iodepth.map(|d| format!("iodepth={d}")),
            _ => None,
        };
        out.push_str(replaced.as_deref().unwrap_or(line));
        out.push('\n');
    }
    Ok(out)
}

/// Runs a job file; returns fio's JSON output (also written to `json_out`).
pub fn run(job_file: &Path, json_out: &Path) -> Result<serde_json::Value, String> {
    let out = Command::new("fio")
        .arg("--output-format=json")
        .arg(format!("--output={}", json_out.display()))
        .arg(job_file)
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio {} failed: {}{}",
            job_file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = std::fs::read_to_string(json_out).map_err(|e| e.to_string())?;
    // fio may print notes before the JSON document.
    let start = text.find('{').ok_or("fio wrote no JSON")?;
    serde_json::from_str(&text[start..]).map_err(|e| format!("fio JSON: {e}"))
}

/// What one fio run measured (reads and writes together for a mixed job).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measure {
    pub iops: f64,
    pub mib_s: f64,
    /// Completion latency, µs.
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Per cent of the machine's CPU time the host stole while the job ran (see
    /// [`crate::host`]); not from fio, set by the harness (`NaN` where unknown).
    pub steal_pct: f64,
    /// CPU time the target's processes spent per operation, µs (see [`crate::host`]): their
    /// CPU seconds over the job's wall time, over its IOPS. Set by the harness; `NaN` where the
    /// target has no process of its own (the local disk: fio does the I/O).
    pub cpu_us_per_op: f64,
    /// The host's speed just before the job (see [`crate::probe`]): the fixed CPU work's
    /// time, µs. Set by the harness; `NaN` where unknown.
    pub cpu_probe_us: f64,
    /// The disk's write + fdatasync latency just before the job, µs (see [`crate::probe`]).
    pub flush_probe_us: f64,
}

/// Extracts the measure of the first job of a fio JSON document (group_reporting merges the
/// clones of `numjobs`). Latencies of a mixed job are those of the direction with more I/O.
pub fn measure(doc: &serde_json::Value) -> Result<Measure, String> {
    let job = doc["jobs"].get(0).ok_or("fio JSON without jobs")?;
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio job error {}", job["error"]));
    }
    let dirs: Vec<&serde_json::Value> = ["read", "write"].iter().map(|d| &job[*d]).collect();
    let iops: f64 = dirs.iter().map(|d| d["iops"].as_f64().unwrap_or(0.0)).sum();
    let bw_kib: f64 = dirs.iter().map(|d| d["bw"].as_f64().unwrap_or(0.0)).sum();
    let main = dirs
        .iter()
        .max_by(|a, b| a["iops"].as_f64().unwrap_or(0.0).total_cmp(&b["iops"].as_f64().unwrap_or(0.0)))
        .unwrap();
    let clat = &main["clat_ns"];
    let pct = |k: &str| clat["percentile"][k].as_f64().unwrap_or(f64::NAN) / 1e3;
    Ok(Measure {
        iops,
        mib_s: bw_kib / 1024.0,
        mean_us: clat["mean"].as_f64().unwrap_or(f64::NAN) / 1e3,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        p999_us: pct("99.900000"),
        steal_pct: f64::NAN,
        cpu_us_per_op: f64::NAN,
        cpu_probe_us: f64::NAN,
        flush_probe_us: f64::NAN,
    })
}

/// The median of `values` (the mean of the middle two for an even count; `NaN` for none).
pub fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median of each field over several runs.
pub fn median(runs: &[Measure]) -> Measure {
    let f = |g: fn(&Measure) -> f64| median_of(runs.iter().map(g).collect());
    Measure {
        iops: f(|m| m.iops),
        mib_s: f(|m| m.mib_s),
        mean_us: f(|m| m.mean_us),
        p50_us: f(|m| m.p50_us),
        p99_us: f(|m| m.p99_us),
        p999_us: f(|m| m.p999_us),
        steal_pct: f(|m| m.steal_pct),
        cpu_us_per_op: f(|m| m.cpu_us_per_op),
        cpu_probe_us: f(|m| m.cpu_probe_us),
        flush_probe_us: f(|m| m.flush_probe_us),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fio-configs")
    }

    #[test]
    fn job_files_are_adapted_to_each_endpoint() {
        let s = JobSettings { runtime_s: 3, ramp_s: 1, size: "64m".into(), iodepth: Some(8) };
        let nbd = job_text(&configs(), "randwrite-4k-qd32", &Endpoint::Nbd { uri: "nbd://x:1/v".into() }, &s).unwrap();
        assert!(nbd.contains("uri=nbd://x:1/v\n") && nbd.contains("iodepth=8\n") && nbd.contains("runtime=3\n"));
        assert!(nbd.contains("size=64m\n") && !nbd.contains("iodepth=32"));
        let file = job_text(&configs(), "randwrite-4k-qd1", &Endpoint::File { path: "/d/f".into() }, &s).unwrap();
        assert!(file.contains("ioengine=io_uring\ndirect=1\nfilename=/d/f\n") && !file.contains("uri="));
        assert!(job_text(&configs(), "no-such-job", &Endpoint::File { path: "/d".into() }, &s).is_err());
    }

    #[test]
    fn measures_come_from_fio_json_and_medians_are_per_field() {
        let doc: serde_json::Value = serde_json::from_str(
            r#"{"jobs":[{"error":0,
              "read":{"iops":0,"bw":0,"clat_ns":{"mean":0}},
              "write":{"iops":1000.0,"bw":4000,"clat_ns":{"mean":900000.0,
                 "percentile":{"50.000000":800000,"99.000000":2000000,"99.900000":5000000}}}}]}"#,
        )
        .unwrap();
        let m = measure(&doc).unwrap();
        assert_eq!((m.iops, m.p50_us, m.p99_us, m.p999_us), (1000.0, 800.0, 2000.0, 5000.0));
        assert!((m.mib_s - 3.90625).abs() < 1e-9);
        assert!(m.steal_pct.is_nan(), "fio does not know the host's steal");
        assert!(m.cpu_us_per_op.is_nan(), "nor the target's CPU time");
        assert!(m.cpu_probe_us.is_nan() && m.flush_probe_us.is_nan(), "nor the host's speed");
        let a = Measure { iops: 1.0, p50_us: 9.0, steal_pct: 30.0, cpu_us_per_op: 80.0, flush_probe_us: 60.0, ..m };
        let b = Measure { iops: 5.0, p50_us: 1.0, steal_pct: 2.0, cpu_us_per_op: 120.0, flush_probe_us: 200.0, ..m };
        let c = Measure { iops: 3.0, p50_us: 4.0, steal_pct: 10.0, cpu_us_per_op: 100.0, flush_probe_us: 50.0, ..m };
        let med = median(&[a, b, c]);
        assert_eq!((med.iops, med.p50_us, med.steal_pct, med.cpu_us_per_op), (3.0, 4.0, 10.0, 100.0));
        assert_eq!(med.flush_probe_us, 60.0);
        assert_eq!(median_of(vec![4.0, 1.0, 3.0, 2.0]), 2.5, "even count: the middle two");
        assert!(median_of(Vec::new()).is_nan());
    }
}
