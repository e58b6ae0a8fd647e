//! The systems under test: the engine (a local three-replica cluster, `chunkserver local`) in
//! either mode, and the single-copy anchors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chunkserver::server::transport::Jitter;

use crate::fio::Endpoint;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `chunkserver local` in `mode` (parallel | raft), messages between servers delayed by
    /// `jitter`.
    Engine {
        mode: String,
        jitter: Jitter,
        lbb_span: usize,
        window: u64,
    },
    NbdkitMemory,
    NbdkitFile,
    LocalDisk,
}

#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    pub kind: Kind,
}

impl Target {
    pub fn is_engine(&self) -> bool {
        matches!(self.kind, Kind::Engine { .. })
    }
}

/// The volume every target exposes (the engine's and nbdkit's size; the local file's size).
pub const VOLUME: &str = "1G";
const VOLUME_BYTES: u64 = 1 << 30;

/// A started target; stopped on drop.
pub struct Running {
    pub endpoint: Endpoint,
    /// The engine's `/metrics` addresses (frontend, then servers 1..=3); empty for anchors.
    pub metrics: Vec<String>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

/// A run of 8 free ports (engine: NBD, 3 peers, 4 metrics endpoints).
fn free_port() -> Result<u16, String> {
    chunkserver::net::free_port_run(8)
}

/// Waits until `nbdinfo` can read the export's size.
fn wait_nbd(uri: &str, child: &mut Child, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("server exited ({status}) before serving {uri}"));
        }
        let ok = Command::new("nbdinfo").args(["--size", uri]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if ok.is_ok_and(|s| s.success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{uri} not served after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Running {
    /// Starts `target` in a fresh temporary directory under `work`. `chunkserver` is the
    /// engine's binary.
    pub fn start(target: &Target, work: &Path, chunkserver: &Path) -> Result<Running, String> {
        let dir = tempfile::Builder::new().prefix("bench-").tempdir_in(work).map_err(|e| e.to_string())?;
        let port = free_port()?;
        let uri = |name: &str| format!("nbd://127.0.0.1:{port}/{name}");
        let (mut child, endpoint) = match &target.kind {
            Kind::Engine { mode, jitter, lbb_span, window } => {
                let child = Command::new(chunkserver)
                    .arg("local")
                    .arg("--data-dir")
                    .arg(dir.path().join("data"))
                    .args(["--port", &port.to_string(), "--peer-base-port", &(port + 1).to_string()])
                    .args(["--size", VOLUME, "--mode", mode])
                    .args(jitter.args())
                    .args(["--lbb-span", &lbb_span.to_string()])
                    .args(["--window", &window.to_string()])
                    .args(["--metrics-port", &(port + 4).to_string()])
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.path().join("engine.log")).map_err(|e| e.to_string())?)
                    .spawn()
                    .map_err(|e| format!("cannot start {}: {e}", chunkserver.display()))?;
                (Some(child), Endpoint::Nbd { uri: uri("vol0") })
            }
            Kind::NbdkitMemory | Kind::NbdkitFile => {
                let mut cmd = Command::new("nbdkit");
                cmd.args(["--foreground", "--exit-with-parent", "--ipaddr", "127.0.0.1", "--port", &port.to_string()]);
                if target.kind == Kind::NbdkitMemory {
                    cmd.args(["memory", VOLUME]);
                } else {
                    let file = dir.path().join("nbdkit.img");
                    make_file(&file)?;
                    cmd.arg("file").arg(format!("file={}", file.display()));
                }
                let child = cmd
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("cannot start nbdkit (apt install nbdkit): {e}"))?;
                (Some(child), Endpoint::Nbd { uri: uri("") })
            }
            Kind::LocalDisk => {
                let file = dir.path().join("disk.img");
                make_file(&file)?;
                (None, Endpoint::File { path: file })
            }
        };
        if let (Some(c), Endpoint::Nbd { uri }) = (child.as_mut(), &endpoint) {
            if let Err(e) = wait_nbd(uri, c, Duration::from_secs(60)) {
                let _ = c.kill();
                let _ = c.wait();
                let log = std::fs::read_to_string(dir.path().join("engine.log")).unwrap_or_default();
                return Err(format!("{}: {e}\n{log}", target.name));
            }
        }
        let metrics =
            if target.is_engine() { (4..8).map(|k| format!("127.0.0.1:{}", port + k)).collect() } else { Vec::new() };
        Ok(Running { endpoint, metrics, child, _dir: dir })
    }
}

fn make_file(path: &PathBuf) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.set_len(VOLUME_BYTES).map_err(|e| e.to_string())
}

impl Running {
    /// The target's own process (the root of the engine's processes), if it has one.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: `chunkserver local` stops its servers cleanly; nbdkit exits.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
