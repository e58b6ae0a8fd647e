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
    fails_with(
        Command::new(BIN).args(["local", "--transport", "quic", "--data-dir"]).arg(&local_dir),
        "--transport \"quic\": want unix or tcp",
    );
    fails_with(
        Command::new(BIN).args(["local", "--poll-us", "1000001", "--data-dir"]).arg(&local_dir),
        "--poll-us must be at most 1000000",
    );
    fails_with(
        Command::new(BIN).args(["nbd", "--poll-us", "2000000", "--config"]).arg(&config),
        "--poll-us must be at most 1000000",
    );
    for bad in ["0", "65M"] {
        fails_with(
            Command::new(BIN).args(["local", "--max-sync-bytes", bad, "--data-dir"]).arg(&local_dir),
            "--max-sync-bytes must be between 1 and 64M",
        );
    }
}

#[test]
fn bad_or_busy_unix_socket_addresses_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    let with_addr = |addr: &str| {
        format!(
            "cluster_id = 1\n[volume]\nname = \"v\"\nsize = \"64M\"\nchunk_size = \"64M\"\n\
             [[server]]\nid = 1\naddr = \"{addr}\"\n[[server]]\nid = 2\naddr = \"unix:@b\"\n\
             [[server]]\nid = 3\naddr = \"unix:@c\"\n"
        )
    };
    let serve = || {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--id", "1", "--data-dir"]).arg(dir.path()).arg("--config").arg(&config);
        cmd
    };
    std::fs::write(&config, with_addr("unix:")).unwrap();
    fails_with(&mut serve(), "bad socket path");
    std::fs::write(&config, with_addr("udp:1.2.3.4:5")).unwrap();
    fails_with(&mut serve(), "want host:port, unix:/path/to/socket or unix:@abstract-name");
    // A name held by a live socket is busy, like a port.
    let name = format!("parallelraft-cli-test-{}", std::process::id());
    let _held = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    std::fs::write(&config, with_addr(&format!("unix:@{name}"))).unwrap();
    fails_with(&mut serve(), &format!("cannot listen on unix:@{name}"));
    // A path that is not a socket is never replaced.
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"keep").unwrap();
    std::fs::write(&config, with_addr(&format!("unix:{}", plain.display()))).unwrap();
    fails_with(&mut serve(), "is not a socket");
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep");
}
