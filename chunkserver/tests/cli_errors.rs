//! The CLI's start-up errors are one clear line and a non-zero exit, not a panic; its logs
//! are plain text where they go to a file.

mod support;

use std::process::Command;

use support::*;

fn fails_with(cmd: &mut Command, needle: &str) {
    let out = cmd.env("NO_COLOR", "1").output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should fail");
    expect_error(cmd, &out.stderr, needle);
}

/// As [`fails_with`] for a command that would serve forever if it did not fail: killed after
/// 30 s, and that is a failure of the test, not a hang.
fn fails_soon_with(cmd: &mut Command, needle: &str) {
    use std::process::Stdio;
    let mut child = cmd.env("NO_COLOR", "1").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{cmd:?} kept running instead of failing with {needle:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!status.success(), "{cmd:?} should fail");
    let mut stderr = Vec::new();
    std::io::Read::read_to_end(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    expect_error(cmd, &stderr, needle);
}

fn expect_error(cmd: &Command, stderr: &[u8], needle: &str) {
    let stderr = String::from_utf8_lossy(stderr);
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

#[test]
fn a_data_directory_of_a_newer_format_is_refused_before_anything_starts() {
    use chunkserver::storage::format::{FORMAT_FILE, FORMAT_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    let name = format!("parallelraft-format-test-{}", std::process::id());
    std::fs::write(
        &config,
        format!(
            "cluster_id = 1\n[volume]\nname = \"v\"\nsize = \"64M\"\nchunk_size = \"64M\"\n\
             [[server]]\nid = 1\naddr = \"unix:@{name}-1\"\n[[server]]\nid = 2\naddr = \"unix:@{name}-2\"\n\
             [[server]]\nid = 3\naddr = \"unix:@{name}-3\"\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let serve = || {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--id", "1", "--data-dir"]).arg(&data).arg("--config").arg(&config);
        cmd
    };
    let newer = format!("{}\n", FORMAT_VERSION + 1);
    std::fs::write(data.join(FORMAT_FILE), &newer).unwrap();
    fails_soon_with(&mut serve(), &format!("data format {}, newer than this chunkserver reads", FORMAT_VERSION + 1));
    assert_eq!(std::fs::read_to_string(data.join(FORMAT_FILE)).unwrap(), newer, "the file is left as it is");
    assert!(!data.join("wal").exists(), "nothing was written");
    std::fs::write(data.join(FORMAT_FILE), "wal\n").unwrap();
    fails_soon_with(&mut serve(), "does not hold a format version");

    // A server stamps the directory it serves.
    std::fs::remove_file(data.join(FORMAT_FILE)).unwrap();
    let mut child = serve().stderr(std::process::Stdio::null()).spawn().unwrap();
    let stamped = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::fs::read_to_string(data.join(FORMAT_FILE)).is_ok_and(|t| t == format!("{FORMAT_VERSION}\n"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(stamped, "a serving server's directory has no format file");

    // The local launcher checks every server's directory before it starts any.
    let local = dir.path().join("local");
    std::fs::create_dir_all(local.join("server-2")).unwrap();
    std::fs::write(local.join("server-2").join(FORMAT_FILE), &newer).unwrap();
    let base = free_ports(4);
    fails_soon_with(
        Command::new(BIN)
            .args(["local", "--port", &base.to_string(), "--peer-base-port", &(base + 1).to_string(), "--data-dir"])
            .arg(&local),
        &format!("data format {}", FORMAT_VERSION + 1),
    );
    assert!(!local.join("server-1").exists(), "a server was started");
}

/// A log that goes to a file, not a terminal, is plain text: no colour escapes, even with
/// NO_COLOR unset (tracing colours by default, terminal or not).
#[test]
fn a_log_written_to_a_file_has_no_colour_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_ports(3);
    let servers: String =
        (0..3).map(|k| format!("[[server]]\nid = {}\naddr = \"127.0.0.1:{}\"\n", k + 1, base + k)).collect();
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!("cluster_id = 1\n[volume]\nname = \"v\"\nsize = \"64M\"\nchunk_size = \"64M\"\n{servers}"),
    )
    .unwrap();
    let data = dir.path().join("server-1");
    std::fs::create_dir(&data).unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(BIN)
        .args(["serve", "--id", "1", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("chunk server up") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(text.contains("INFO") && text.contains("chunk server up"), "{text:?}");
    assert!(!text.contains('\x1b'), "colour escapes in a log file: {text:?}");
}
