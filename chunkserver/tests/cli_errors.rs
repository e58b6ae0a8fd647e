//! The CLI's start-up errors are one clear line and a non-zero exit, not a panic.

mod support;

use std::process::Command;

use support::*;

fn fails_with(cmd: &mut Command, needle: &str) {
    let out = cmd.env("NO_COLOR", "1").output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.starts_with("chunkserver: ") && last.contains(needle), "{cmd:?}: unexpected error {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_config_busy_port_and_missing_data_dir_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, "cluster_id = 1\n[volume]\nname = \"v\"\nsize = \"1X\"\nchunk_size = \"64M\"\n").unwrap();
    fails_with(
        Command::new(BIN).args(["serve", "--id", "1", "--data-dir"]).arg(dir.path()).arg("--config").arg(&config),
        "bad cluster file",
    );
    std::fs::write(&config, "cluster_id = 1\n[volume]\nname = \"v\"\nsize = \"1X\"\nchunk_size = \"64M\"\n[[server]]\nid = 1\naddr = \"127.0.0.1:1\"\n").unwrap();
    fails_with(
        Command::new(BIN).args(["serve", "--id", "1", "--data-dir"]).arg(dir.path()).arg("--config").arg(&config),
        "unknown unit",
    );
    fails_with(
        Command::new(BIN).args(["serve", "--id", "1", "--data-dir", "/nonexistent/dir", "--config"]).arg(&config),
        "bad cluster file",
    );
    let base = free_ports(4);
    let good = format!(
        "cluster_id = 1\n[volume]\nname = \"v\"\nsize = \"64M\"\nchunk_size = \"64M\"\n\
         [[server]]\nid = 1\naddr = \"127.0.0.1:{}\"\n[[server]]\nid = 2\naddr = \"127.0.0.1:{}\"\n\
         [[server]]\nid = 3\naddr = \"127.0.0.1:{}\"\n",
        base,
        base + 1,
        base + 2
    );
    std::fs::write(&config, good).unwrap();
    fails_with(
        Command::new(BIN).args(["serve", "--id", "1", "--data-dir", "/nonexistent/dir", "--config"]).arg(&config),
        "does not exist",
    );
    let _busy = std::net::TcpListener::bind(("127.0.0.1", base)).unwrap();
    fails_with(
        Command::new(BIN).args(["serve", "--id", "1", "--data-dir"]).arg(dir.path()).arg("--config").arg(&config),
        "cannot listen on",
    );
    let local_dir = dir.path().join("local");
    fails_with(
        Command::new(BIN)
            .args(["local", "--port", &base.to_string(), "--peer-base-port", &(base + 1).to_string(), "--data-dir"])
            .arg(&local_dir),
        "cannot listen for NBD",
    );
    fails_with(Command::new(BIN).args(["local", "--mode", "fast", "--data-dir"]).arg(&local_dir), "unknown mode");
    fails_with(
        Command::new(BIN).args(["local", "--io-engine", "aio", "--data-dir"]).arg(&local_dir),
        "unknown io engine",
    );
    fails_with(
        Command::new(BIN).args(["local", "--straggler-per-mille", "2000", "--data-dir"]).arg(&local_dir),
        "--straggler-per-mille must be at most 1000",
    );
    for bad in ["0", "65M"] {
        fails_with(
            Command::new(BIN).args(["local", "--max-sync-bytes", bad, "--data-dir"]).arg(&local_dir),
            "--max-sync-bytes must be between 1 and 64M",
        );
    }
}
