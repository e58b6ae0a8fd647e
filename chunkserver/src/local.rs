//! The one-command local cluster: chunk server processes on this host (three by default;
//! `--servers 4` leaves room to move replicas when one dies) and the NBD frontend in this
//! process.
//!
//! The data directory holds `cluster.toml` (written on first start, reused after), one
//! `server-N/` directory and one `server-N.pid` file per chunk server. A restart with the same
//! directory serves the same data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use tracing::{info, warn};

use crate::config::{parse_size, Cluster, ClusterFile, ServerFile, VolumeFile};
use crate::nbd::{self, Export};
use crate::net::StdListener;
use crate::server::transport::Jitter;
use crate::volume::Volume;

pub struct LocalOptions {
    pub data_dir: PathBuf,
    pub bind: String,
    pub port: u16,
    pub size: Option<String>,
    pub chunk_size: Option<String>,
    pub mode: Option<String>,
    pub io_engine: String,
    /// Servers of a new cluster file listen on abstract unix sockets (else on TCP ports from
    /// `peer_base_port`).
    pub unix_sockets: bool,
    pub peer_base_port: u16,
    pub lbb_span: usize,
    pub window: u64,
    pub jitter: Jitter,
    pub rebuild_rate: u64,
    pub checkpoint_interval: u64,
    pub max_sync_bytes: u64,
    /// Polling window of the frontend and of every server (`--poll-us`, see [`crate::poll`]).
    pub poll: Duration,
    /// Chunk servers to run (default: 3 for a new directory, what it has for an existing one).
    pub servers: Option<u32>,
    /// `/metrics` of the frontend on this port of `bind`, of server N on port + N; 0: none.
    pub metrics_port: u16,
}

pub const DEFAULT_SIZE: &str = "1G";
/// Small enough that a laptop volume has several chunks (several groups per server, leaders
/// spread), large enough that a chunk's metadata stays tiny.
pub const DEFAULT_CHUNK_SIZE: &str = "256M";
pub const DEFAULT_SERVERS: u32 = 3;

fn cluster_path(dir: &Path) -> PathBuf {
    dir.join("cluster.toml")
}

/// Loads the cluster of an existing directory (checking the options agree with it) or
/// writes a new one.
fn prepare(opts: &LocalOptions) -> Result<Cluster, String> {
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|e| format!("cannot create data directory {}: {e}", opts.data_dir.display()))?;
    let path = cluster_path(&opts.data_dir);
    let mut file: ClusterFile = if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut file: ClusterFile =
            toml::from_str(&text).map_err(|e| format!("bad cluster file {}: {}", path.display(), e.message()))?;
        if let Some(n) = opts.servers {
            let have = file.servers.len() as u32;
            if n < have {
                return Err(format!(
                    "{} already has {have} servers; `local` cannot run fewer (decommission one with `chunkserver admin`)",
                    opts.data_dir.display()
                ));
            }
            // New servers join as spares: they hold nothing until replicas are moved to them.
            let next = file.servers.iter().map(|s| s.id).max().unwrap_or(0);
            for id in next + 1..=next + (n - have) {
                file.servers.push(server_file(opts, file.cluster_id, id, true));
            }
        }
        if let Some(size) = &opts.size {
            if parse_size(size)? != parse_size(&file.volume.size)? {
                return Err(format!(
                    "{} already holds a volume of {}; use another --data-dir for a volume of {size}",
                    opts.data_dir.display(),
                    file.volume.size
                ));
            }
        }
        file
    } else {
        let size = opts.size.clone().unwrap_or_else(|| DEFAULT_SIZE.into());
        let chunk_size = opts.chunk_size.clone().unwrap_or_else(|| DEFAULT_CHUNK_SIZE.into());
        let cluster_id = std::process::id() as u64 ^ 0x7072_6166_7400_0000;
        ClusterFile {
            cluster_id,
            volume: VolumeFile { name: "vol0".into(), size, chunk_size, mode: "parallel".into() },
            servers: (1..=opts.servers.unwrap_or(DEFAULT_SERVERS))
                .map(|i| server_file(opts, cluster_id, i, false))
                .collect(),
        }
    };
    if let Some(mode) = &opts.mode {
        file.volume.mode = mode.clone();
    }
    let cluster = Cluster::from_file(file.clone())?;
    let text = toml::to_string_pretty(&file).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(cluster)
}

/// Server `id`'s entry in a cluster file: an abstract unix socket named after the cluster (two
/// local clusters on one host never collide; a restart finds its servers under the same
/// names), or a TCP port.
fn server_file(opts: &LocalOptions, cluster_id: u64, id: u32, spare: bool) -> ServerFile {
    let addr = if opts.unix_sockets {
        format!("unix:@parallelraft-{cluster_id:016x}-server-{id}")
    } else {
        format!("127.0.0.1:{}", opts.peer_base_port as u32 + id - 1)
    };
    ServerFile { id, addr, spare }
}

/// Server `id`'s data directory.
fn server_dir(opts: &LocalOptions, id: u32) -> PathBuf {
    opts.data_dir.join(format!("server-{id}"))
}

fn spawn_server(opts: &LocalOptions, id: u32) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let dir = server_dir(opts, id);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--config")
        .arg(cluster_path(&opts.data_dir))
        .arg("--id")
        .arg(id.to_string())
        .arg("--data-dir")
        .arg(&dir)
        .arg("--io-engine")
        .arg(&opts.io_engine)
        .arg("--lbb-span")
        .arg(opts.lbb_span.to_string())
        .arg("--window")
        .arg(opts.window.to_string())
        .args(opts.jitter.args())
        .arg("--rebuild-rate")
        .arg(opts.rebuild_rate.to_string())
        .arg("--checkpoint-interval")
        .arg(opts.checkpoint_interval.to_string())
        .arg("--max-sync-bytes")
        .arg(opts.max_sync_bytes.to_string())
        .arg("--poll-us")
        .arg(opts.poll.as_micros().to_string());
    if opts.metrics_port != 0 {
        cmd.arg("--metrics").arg(format!("{}:{}", opts.bind, opts.metrics_port as u32 + id));
    }
    // The servers die with this process, whatever kills it.
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start chunk server {id}: {e}"))?;
    std::fs::write(opts.data_dir.join(format!("server-{id}.pid")), format!("{}\n", child.id()))
        .map_err(|e| format!("cannot write pid file: {e}"))?;
    Ok(child)
}

/// Runs the local cluster until Ctrl-C (SIGINT) or SIGTERM.
pub fn run(opts: LocalOptions) -> Result<(), String> {
    let cluster = prepare(&opts)?;
    let addr: std::net::SocketAddr = format!("{}:{}", opts.bind, opts.port)
        .parse()
        .map_err(|_| format!("bad bind address {}:{}", opts.bind, opts.port))?;
    // Check the NBD port before starting anything, so a busy port is one clear error.
    let std_listener =
        std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen for NBD on {addr}: {e}"))?;
    std_listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    for (id, peer_addr) in &cluster.servers {
        if let Err(e) = StdListener::bind(peer_addr) {
            return Err(format!("chunk server {} cannot listen on {peer_addr}: {e}", id.0));
        }
    }
    // One clear error before anything starts, rather than servers exiting one by one.
    for (id, _) in &cluster.servers {
        crate::storage::format::check(&server_dir(&opts, id.0))?;
    }
    let server_count = cluster.servers.len();
    let mut children = Vec::new();
    for (id, _) in &cluster.servers {
        children.push((id.0, spawn_server(&opts, id.0)?));
    }
    let runtime = nbd::frontend_runtime(opts.poll)?;
    let name = cluster.volume_name.clone();
    let size = cluster.size_bytes;
    let mode = cluster.mode;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
        let volume = Volume::new(cluster);
        volume.watch(&cluster_path(&opts.data_dir));
        volume.poll(opts.poll);
        if opts.metrics_port != 0 {
            match format!("{}:{}", opts.bind, opts.metrics_port).parse() {
                Ok(a) => volume.serve_metrics(a),
                Err(_) => warn!("bad metrics address {}:{}", opts.bind, opts.metrics_port),
            }
        }
        let export = Export { name: name.clone(), description: format!("parallelraft volume ({mode:?} mode)"), volume };
        info!(data_dir = %opts.data_dir.display(), size, ?mode, servers = server_count, "local cluster: chunk servers started");
        println!("{}", nbd::uri(addr, &name));
        nbd::log_ready(addr, &name);
        let server = tokio::spawn(nbd::serve(listener, export));
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let mut watch = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = watch.tick() => {
                    for (id, child) in children.iter_mut() {
                        if let Ok(Some(status)) = child.try_wait() {
                            warn!(server = *id, %status, "chunk server exited; the volume keeps serving while a majority is up");
                            *id = 0;
                        }
                    }
                    children.retain(|(id, _)| *id != 0);
                }
            }
        }
        server.abort();
        info!("stopping the local cluster");
        for (_, child) in children.iter_mut() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for (_, child) in children.iter_mut() {
            let _ = child.wait();
        }
        Ok::<(), String>(())
    })?;
    runtime.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}
