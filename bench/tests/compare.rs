//! The harness end to end, briefly: one engine target and one anchor, one-second jobs. Checks
//! that every job produced a measure (with the targets' CPU per operation), that the summary,
//! table, plots and the engine's stage profile are written, and that the host was probed
//! before every job. (Performance itself is never asserted.)

use std::process::Command;

#[test]
fn compare_runs_jobs_on_engine_and_anchor_and_writes_every_output() {
    for tool in ["fio", "nbdkit", "nbdinfo"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).status().unwrap().success();
        assert!(found, "{tool} is required (bash .ci/run installs it)");
    }
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["compare", "--quick", "--runtime", "1", "--targets", "parallel,nbdkit-memory", "--out"])
        .arg(out.path())
        .arg("--work")
        .arg(out.path())
        // Built already by `cargo test`; do not run cargo from inside it.
        .env_remove("CARGO")
        .status()
        .unwrap();
    assert!(status.success());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap()).unwrap();
    let rows = summary["results"].as_array().unwrap();
    for job in
        ["randwrite-4k-qd1", "randwrite-4k-qd32", "randread-4k-qd32", "seqwrite-128k-qd16", "durable-write-4k-qd1"]
    {
        for target in ["parallel", "nbdkit-memory"] {
            let row = rows.iter().find(|r| r["job"] == job && r["target"] == target);
            let iops = row.and_then(|r| r["iops"].as_f64()).unwrap_or(0.0);
            assert!(iops > 0.0, "{job} on {target}: {row:?}");
        }
    }
    // Both targets' processes spend CPU on random writes (seconds of work at thousands of IOPS).
    for target in ["parallel", "nbdkit-memory"] {
        let row = rows.iter().find(|r| r["job"] == "randwrite-4k-qd32" && r["target"] == target);
        let cpu = row.and_then(|r| r["cpu_us_per_op"].as_f64()).unwrap_or(0.0);
        assert!(cpu > 0.0 && cpu.is_finite(), "no CPU per operation for {target}: {row:?}");
    }
    // Every job was preceded by the host probes (a fixed piece of CPU work, durable writes in
    // the work directory).
    for row in rows {
        for probe in ["cpu_probe_us", "flush_probe_us"] {
            let us = row[probe].as_f64().unwrap_or(0.0);
            assert!(us > 0.0 && us.is_finite(), "no {probe}: {row}");
        }
    }
    let table = std::fs::read_to_string(out.path().join("table.txt")).unwrap();
    assert!(table.contains("x nbdkit-memory") && table.contains("goals"), "{table}");
    for svg in ["iops-vs-iodepth.svg", "latency-vs-iodepth.svg", "profile/parallel-r1.svg"] {
        let text = std::fs::read_to_string(out.path().join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.contains("<rect"), "{svg}");
    }
    let profile = std::fs::read_to_string(out.path().join("profile/parallel-r1.txt")).unwrap();
    assert!(profile.contains("nbd_write") && profile.contains("wal_sync"), "{profile}");
    assert!(out.path().join("raw/parallel-randwrite-4k-qd32-r1.json").exists());
}
