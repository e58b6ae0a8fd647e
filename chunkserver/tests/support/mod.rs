//! Real-process test support: a `chunkserver local` cluster in a temporary directory on free
//! ports, with helpers to find chunk leaders and to kill and restart chunk servers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_chunkserver");

/// Real clusters are heavy on a 2-core machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// One line of a server's `status` file.
#[derive(Clone, Debug)]
pub struct ChunkStatus {
    pub chunk: u32,
    pub role: String,
    pub term: u64,
    pub committed: u64,
    pub applied: u64,
    pub bad_blocks: u64,
    pub repaired: u64,
    pub voters: Vec<u32>,
    pub learners: Vec<u32>,
    /// The index the replica's last durable checkpoint covers.
    pub checkpoint: u64,
}

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A base port with `n` consecutive free ports, outside the ephemeral range (see
/// [`chunkserver::net::free_port_run`]).
pub fn free_ports(n: u16) -> u16 {
    chunkserver::net::free_port_run(n).unwrap()
}

/// `qemu-io -f raw -c CMD ... URI`.
pub fn qemu_io(uri: &str, script: &[&str]) -> Command {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for s in script {
        cmd.arg("-c").arg(s);
    }
    cmd.arg(uri);
    cmd
}

pub fn require_tool(name: &str) {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().unwrap().status.success();
    assert!(found, "{name} is required (bash .ci/run installs it)");
}

pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub peer_base: u16,
    pub mode: String,
    pub size: String,
    /// Chunk servers `local` runs (ids 1..=servers).
    pub servers: u32,
    /// More arguments for `local`.
    pub extra: Vec<String>,
    local: Option<Child>,
    /// Servers restarted by the test (not children of `local`).
    restarted: Vec<(u32, Child)>,
}

impl LocalCluster {
    pub fn start(mode: &str, size: &str) -> LocalCluster {
        LocalCluster::start_with(mode, size, 3, &[])
    }

    /// `local --servers servers` with `extra` arguments.
    pub fn start_with(mode: &str, size: &str, servers: u32, extra: &[&str]) -> LocalCluster {
        let base = free_ports(2 + 2 * servers as u16);
        let mut c = LocalCluster {
            dir: tempfile::tempdir().unwrap(),
            port: base,
            peer_base: base + 1,
            mode: mode.into(),
            size: size.into(),
            servers,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            local: None,
            restarted: Vec::new(),
        };
        c.launch();
        c
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/vol0", self.port)
    }

    /// `/metrics` of the frontend; server N's is at this port + N.
    pub fn metrics_port(&self) -> u16 {
        self.peer_base + self.servers as u16
    }

    pub fn data(&self) -> &Path {
        self.dir.path()
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.data().join(format!("local-{}.log", self.port))).unwrap();
        let child = Command::new(BIN)
            .args(["local", "--data-dir"])
            .arg(self.data())
            .args(["--port", &self.port.to_string(), "--peer-base-port", &self.peer_base.to_string()])
            .args(["--size", &self.size, "--chunk-size", "64M", "--mode", &self.mode])
            .args(["--metrics-port", &self.metrics_port().to_string()])
            .args(["--servers", &self.servers.to_string()])
            .args(&self.extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        self.local = Some(child);
        self.wait_ready();
    }

    /// Waits until every chunk has a serving leader and the NBD port answers.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let chunks = self.chunk_count();
        loop {
            // A server that died at start (a port taken, say) would leave a two-server
            // cluster that the test then mistakes for a full one.
            let log = self.log_text();
            assert!(!log.contains("chunk server exited"), "a chunk server exited at start; log:\n{}", self.log_tail());
            let led = (0..chunks).all(|c| self.leader_of(c).is_some());
            if led && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "cluster not ready in 30 s; log:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn chunk_count(&self) -> u32 {
        let size = chunkserver::config::parse_size(&self.size).unwrap();
        size.div_ceil(64 << 20) as u32
    }

    /// Everything `local` and its servers logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.data().join(format!("local-{}.log", self.port))).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn status(&self, server: u32) -> Vec<(u32, String, u64)> {
        self.chunk_status(server).into_iter().map(|s| (s.chunk, s.role, s.term)).collect()
    }

    /// The chunk lines of a server's `status` file (empty while it is down).
    pub fn chunk_status(&self, server: u32) -> Vec<ChunkStatus> {
        let path = self.data().join(format!("server-{server}")).join("status");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let num = |k: usize| f.get(k)?.parse::<u64>().ok();
                Some(ChunkStatus {
                    chunk: f.first()?.parse().ok()?,
                    role: f.get(1)?.to_string(),
                    term: num(2)?,
                    committed: num(3)?,
                    applied: num(4)?,
                    bad_blocks: num(5)?,
                    repaired: num(6)?,
                    voters: ids(f.get(7).copied()),
                    learners: ids(f.get(8).copied()),
                    checkpoint: num(9)?,
                })
            })
            .collect()
    }

    /// The live server that serves as leader of `chunk` in the highest term, if any.
    pub fn leader_of(&self, chunk: u32) -> Option<u32> {
        (1..=self.servers)
            .filter(|s| self.is_alive(*s))
            .filter_map(|s| {
                self.status(s).into_iter().find(|(c, role, _)| *c == chunk && role == "Leader").map(|(_, _, t)| (t, s))
            })
            .max()
            .map(|(_, s)| s)
    }

    /// Waits until `server` has applied `chunk` up to `target` (a leader's commit index);
    /// fails the test at `deadline`.
    pub fn wait_applied(&self, server: u32, chunk: u32, target: u64, deadline: Instant) {
        while self.chunk_status(server).iter().find(|s| s.chunk == chunk).is_none_or(|s| s.applied < target) {
            assert!(
                Instant::now() < deadline,
                "server {server} did not apply chunk {chunk} up to {target}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid_of(&self, server: u32) -> Option<i32> {
        if let Some((_, child)) = self.restarted.iter().find(|(s, _)| *s == server) {
            return Some(child.id() as i32);
        }
        let text = std::fs::read_to_string(self.data().join(format!("server-{server}.pid"))).ok()?;
        text.trim().parse().ok()
    }

    pub fn is_alive(&self, server: u32) -> bool {
        self.pid_of(server).is_some_and(|pid| {
            // A zombie (killed, not yet reaped by `local`) counts as dead.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
                .unwrap_or(false)
        })
    }

    /// SIGKILL a chunk server.
    pub fn kill(&mut self, server: u32) {
        let pid = self.pid_of(server).expect("server pid");
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if let Some(k) = self.restarted.iter().position(|(s, _)| *s == server) {
            let (_, mut child) = self.restarted.remove(k);
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.is_alive(server) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(self.data().join(format!("server-{server}")).join("status"));
    }

    /// Starts a killed chunk server again (as `local` would), from its data directory.
    pub fn restart(&mut self, server: u32) {
        self.start_server(server, &[]);
    }

    /// Stops the whole cluster as Ctrl-C would.
    pub fn stop(&mut self) {
        for (_, mut child) in self.restarted.drain(..) {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        if let Some(mut local) = self.local.take() {
            unsafe { libc::kill(local.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if local.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = local.kill();
                    let _ = local.wait();
                    panic!("local cluster did not stop on SIGINT");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Stops and starts the cluster on the same data directory.
    pub fn restart_all(&mut self) {
        self.stop();
        for s in 1..=self.servers {
            let _ = std::fs::remove_file(self.data().join(format!("server-{s}")).join("status"));
        }
        self.launch();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for (_, mut child) in self.restarted.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut local) = self.local.take() {
            unsafe { libc::kill(local.id() as i32, libc::SIGTERM) };
            let _ = local.wait();
        }
    }
}

/// A comma list of server ids (`-`: none).
fn ids(field: Option<&str>) -> Vec<u32> {
    field.unwrap_or("-").split(',').filter_map(|t| t.parse().ok()).collect()
}

impl LocalCluster {
    /// `chunkserver admin --data-dir DIR ARGS...`.
    pub fn admin(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["admin", "--data-dir"]).arg(self.data()).args(args).env("NO_COLOR", "1");
        cmd
    }

    /// Starts a server that `local` does not run (a restarted one, or one added later), with
    /// `extra` arguments.
    pub fn start_server(&mut self, server: u32, extra: &[&str]) {
        let dir = self.data().join(format!("server-{server}"));
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(self.data().join(format!("server-{server}-restart.log"))).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(self.data().join("cluster.toml"))
            .args(["--id", &server.to_string(), "--data-dir"])
            .arg(&dir)
            .args(extra)
            .env("NO_COLOR", "1")
            .stderr(log)
            .spawn()
            .unwrap();
        self.restarted.push((server, child));
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn tmp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A verifying fio run on the nbd engine: random 4 KiB writes, then every block read back
/// and checked (crc32c), JSON output; `numjobs` connections, job k at `k * offset_mib`.
pub fn fio_verify(uri: &str, iodepth: u32, numjobs: u32, size_mib: u64, offset_mib: u64) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args(["--name=verify", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"])
        .arg(format!("--iodepth={iodepth}"))
        .arg(format!("--numjobs={numjobs}"))
        .arg(format!("--size={size_mib}m"))
        .arg(format!("--offset_increment={offset_mib}m"))
        .args(["--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0"])
        .args(["--group_reporting", "--output-format=json"])
        .arg(format!("--uri={uri}"));
    cmd
}

/// Waits for a fio run started with piped output; asserts it succeeded without error and
/// returns its (group-reported) job.
pub fn fio_finished(fio: std::process::Child) -> serde_json::Value {
    fio_succeeded(fio.wait_with_output().unwrap())
}

/// [`fio_finished`], waiting at most `limit` (its output is read meanwhile, so a full pipe
/// cannot stall fio); `None`, with fio killed, when it has not finished by then.
pub fn fio_finished_within(fio: std::process::Child, limit: Duration) -> Option<serde_json::Value> {
    let pid = fio.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(fio.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => Some(fio_succeeded(out.unwrap())),
        Err(_) => {
            // SAFETY: kill(2) only delivers a signal to the named process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            None
        }
    }
}

/// Asserts a finished fio run succeeded without error; returns its (group-reported) job.
fn fio_succeeded(out: Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fio failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let job = fio_job(&stdout);
    assert_eq!(job["error"], 0, "{job}");
    job
}

/// The (group-reported) job of fio's JSON output.
pub fn fio_job(stdout: &str) -> serde_json::Value {
    let json: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find('{').expect("fio printed no JSON")..]).expect("fio json");
    json["jobs"][0].clone()
}

/// The value of `name` (a whole metric name, labels included) in a `/metrics` text.
pub fn counter(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(&format!("{name} "))).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits (up to `limit`: `/metrics` is rendered every 500 ms) until counter `name` at `addr`
/// reaches `at_least`; panics with the last text otherwise.
pub fn wait_for_counter(addr: &str, name: &str, at_least: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let text = chunkserver::profile::fetch(addr).unwrap();
        let value = counter(&text, name).unwrap_or(0.0);
        if value >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{name} at {addr} is {value}, not {at_least}:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number after `word` on `server`'s line for `chunk` in `admin status` (`rebuilt`: bytes
/// received to rebuild the replica since the server started; `checkpoint`: its checkpoint).
pub fn status_figure(c: &LocalCluster, chunk: u32, server: u32, word: &str) -> u64 {
    let status = run_ok(&mut c.admin(&["status"]));
    status
        .lines()
        .skip_while(|l| !l.starts_with(&format!("chunk {chunk}:")))
        .skip(1)
        .take_while(|l| !l.starts_with("chunk "))
        .find(|l| l.trim_start().starts_with(&format!("server {server}:")))
        .and_then(|l| l.split(&format!("{word} ")).nth(1))
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {word} figure for server {server} in:\n{status}"))
}

/// Sends `signal` to a process.
pub fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) only delivers a signal to the named process.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill({pid}, {signal})");
}

/// Continues a stopped server when dropped, so a failing test still lets the cluster stop.
pub struct Thaw(pub i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}
