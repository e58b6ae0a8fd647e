//! `chunkserver`: run a chunk server, an NBD frontend, or a whole local cluster.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use parallelraft::ReplicaId;

use chunkserver::config::Cluster;
use chunkserver::local::{self, LocalOptions};
use chunkserver::nbd::{self, Export};
use chunkserver::poll::DEFAULT_POLL_US;
use chunkserver::server::group::StorageOptions;
use chunkserver::server::transport::Jitter;
use chunkserver::server::{
    self, ServerOptions, DEFAULT_CHECKPOINT_INTERVAL, DEFAULT_LBB_SPAN, DEFAULT_MAX_SYNC_BYTES, DEFAULT_REBUILD_RATE,
    DEFAULT_WINDOW,
};
use chunkserver::storage::io::EngineKind;
use chunkserver::volume::Volume;

#[derive(Parser)]
#[command(name = "chunkserver", version, about = "ParallelRaft chunk servers and their NBD frontend")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Protocol and benchmark settings of the chunk servers (`serve`, and `local` passes them on).
#[derive(clap::Args)]
struct Tuning {
    /// Look-behind span N: each entry carries the ranges of its N predecessors.
    #[arg(long, default_value_t = DEFAULT_LBB_SPAN)]
    lbb_span: usize,
    /// Entries a chunk's leader keeps in flight past its committed watermark (at least 1).
    /// Above N + 1 a follower's hole can be wider than the span: it then applies nothing past
    /// the hole until it is filled, while the leader keeps committing around it.
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    window: u64,
    /// Benchmarks only: delay every message between chunk servers by a random 0..=N µs, which
    /// reorders them. The receiving server holds each one until it is due (it polls while one
    /// is due within 2 ms, so the delay is what was drawn, not rounded up to a timer's 1 ms).
    #[arg(long, default_value_t = 0)]
    jitter_us: u64,
    /// Benchmarks only: on top of --jitter-us, hold one message in 1000/K (K is
    /// --straggler-per-mille) for N µs more: the rare long delay an in-order protocol stalls behind.
    #[arg(long, default_value_t = 0)]
    straggler_us: u64,
    /// Benchmarks only: how many messages in 1000 --straggler-us holds.
    #[arg(long, default_value_t = 20)]
    straggler_per_mille: u32,
    /// Cap on the bytes per second a server sends to rebuild other replicas (e.g. 64M; 0: no
    /// cap). Whatever the cap, a foreground message waits behind at most one 256 KiB rebuild
    /// frame on a link.
    #[arg(long, default_value = DEFAULT_REBUILD_RATE)]
    rebuild_rate: String,
    /// Entries between checkpoints of a chunk (after one, the log below it is pruned, and a
    /// replica further behind is rebuilt from the block image instead of the log).
    #[arg(long, default_value_t = DEFAULT_CHECKPOINT_INTERVAL)]
    checkpoint_interval: u64,
    /// Most bytes of log entries in one Sync message (at most 64M): a new leader sends each
    /// follower its decided log in chunks of this size. Tests set it small, so that every
    /// election sends many.
    #[arg(long, default_value = DEFAULT_MAX_SYNC_BYTES)]
    max_sync_bytes: String,
    /// How long a server's threads (and `local`'s frontend) keep polling for work after their
    /// last, in µs, instead of sleeping at once: a thread woken from sleep by another vCPU
    /// costs tens of µs on each hand-off. 0: never poll. At most 1000000.
    #[arg(long, default_value_t = DEFAULT_POLL_US)]
    poll_us: u64,
}

/// `--poll-us` as a window, checked.
fn poll_window(us: u64) -> Result<Duration, String> {
    if us > 1_000_000 {
        return Err(format!("--poll-us must be at most 1000000 (1 s), not {us}"));
    }
    Ok(Duration::from_micros(us))
}

impl Tuning {
    fn jitter(&self) -> Result<Jitter, String> {
        Jitter::new(self.jitter_us, self.straggler_us, self.straggler_per_mille)
    }

    fn rebuild_rate_bytes(&self) -> Result<u64, String> {
        chunkserver::config::parse_size(&self.rebuild_rate).map_err(|e| format!("--rebuild-rate: {e}"))
    }

    fn max_sync_bytes(&self) -> Result<u64, String> {
        let bytes =
            chunkserver::config::parse_size(&self.max_sync_bytes).map_err(|e| format!("--max-sync-bytes: {e}"))?;
        if bytes == 0 || bytes > 64 << 20 {
            return Err(format!("--max-sync-bytes must be between 1 and 64M, not {}", self.max_sync_bytes));
        }
        Ok(bytes)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster (three replicas per chunk) and serve its volume over NBD (Ctrl-C
    /// stops it).
    Local {
        /// Where the cluster keeps its data; reused on restart.
        #[arg(long, default_value = "parallelraft-data")]
        data_dir: PathBuf,
        #[arg(short = 'b', long, default_value = "127.0.0.1")]
        bind: String,
        #[arg(short = 'p', long, default_value_t = 10809)]
        port: u16,
        /// Volume size for a new data directory (e.g. 1G); must match an existing one.
        #[arg(long)]
        size: Option<String>,
        /// Chunk size for a new data directory (default 256M).
        #[arg(long)]
        chunk_size: Option<String>,
        /// parallel (out-of-order, the default) or raft (classic in-order).
        #[arg(long)]
        mode: Option<String>,
        /// sync (pwrite/fdatasync on the calling thread, the default), uring (io_uring), or auto
        /// (io_uring, falling back to sync where the kernel refuses it). sync is the default
        /// because io_uring hands every fdatasync to a kernel worker thread: on a group commit that
        /// hand-off cost more than it saved (measured: 4 KiB randwrite at iodepth 32, 1.45-1.6x the
        /// IOPS of uring; at iodepth 1, p50 465-489 µs against 586-651 µs).
        #[arg(long, default_value = "sync")]
        io_engine: String,
        /// How the frontend and the chunk servers of a new data directory reach each other:
        /// unix (the default: sockets in the abstract namespace, as all run on this host) or
        /// tcp (127.0.0.1, server N on --peer-base-port + N - 1). A unix socket spares each
        /// message the loopback TCP stack (measured: the frontend's CPU per 4 KiB read at
        /// iodepth 32 8.2-9.3 µs against 9.7-10.9 µs over TCP). An existing directory keeps
        /// the addresses in its cluster.toml.
        #[arg(long, default_value = "unix")]
        transport: String,
        /// First of the chunk servers' TCP ports (server N listens on this + N - 1) with
        /// `--transport tcp`.
        #[arg(long, default_value_t = 20101)]
        peer_base_port: u16,
        /// Chunk servers to run (at least 3). Each chunk keeps three replicas; a fourth server
        /// is room to move replicas to when one dies. More than an existing data directory
        /// has adds spares (empty servers).
        #[arg(long)]
        servers: Option<u32>,
        #[command(flatten)]
        tuning: Tuning,
        /// `/metrics` of the NBD frontend on this port, of chunk server N on this port + N
        /// (0: no metrics). `chunkserver profile` reads them.
        #[arg(long, default_value_t = DEFAULT_METRICS_PORT)]
        metrics_port: u16,
    },
    /// Run one chunk server of a cluster.
    Serve {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        id: u32,
        /// This server's own directory (must exist).
        #[arg(long)]
        data_dir: PathBuf,
        /// sync (the default), uring or auto, as for `local`.
        #[arg(long, default_value = "sync")]
        io_engine: String,
        /// Protocol tick (heartbeats every 2 ticks, elections after 10 to 20).
        #[arg(long, default_value_t = 20)]
        tick_ms: u64,
        #[command(flatten)]
        tuning: Tuning,
        /// Serve Prometheus `/metrics` on this address (e.g. 127.0.0.1:9181).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Serve a cluster's volume over NBD (the frontend alone, for a multi-machine cluster).
    Nbd {
        #[arg(long)]
        config: PathBuf,
        #[arg(short = 'b', long, default_value = "127.0.0.1")]
        bind: String,
        #[arg(short = 'p', long, default_value_t = 10809)]
        port: u16,
        /// Serve Prometheus `/metrics` on this address (e.g. 127.0.0.1:9180).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// How long the frontend keeps polling for work after its last, in µs (see `serve
        /// --poll-us`). 0: never poll.
        #[arg(long, default_value_t = DEFAULT_POLL_US)]
        poll_us: u64,
    },
    /// Print where a write's time goes (p50 / p99 per stage) from the `/metrics` of a running
    /// cluster, and draw it as an SVG picture.
    Profile {
        /// The `/metrics` addresses (default: a `local` cluster's frontend and servers 1 to 3).
        #[arg(long, value_delimiter = ',', default_values_t = default_profile_targets())]
        metrics: Vec<String>,
        /// Write the picture here.
        #[arg(long, default_value = "profile.svg")]
        svg: PathBuf,
    },
    /// Operator commands on a running cluster: membership changes, moving replicas, scrub.
    Admin {
        /// The cluster file (default: the one in --data-dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A `local` cluster's data directory.
        #[arg(long, default_value = "parallelraft-data")]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: AdminCmd,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Every group's leader, configuration and replicas.
    Status,
    /// Move every replica off a server (alive or dead) onto the others, online.
    Decommission {
        #[arg(long)]
        server: u32,
    },
    /// Move every replica of a (dead) server onto another server, e.g. a new spare.
    Replace {
        #[arg(long)]
        server: u32,
        #[arg(long)]
        with: u32,
    },
    /// Move one chunk's replica from one server to another.
    Move {
        #[arg(long)]
        chunk: u32,
        #[arg(long)]
        from: u32,
        #[arg(long)]
        to: u32,
    },
    /// Add a server to a chunk's group as a non-voting learner (it is rebuilt in the background).
    AddLearner {
        #[arg(long)]
        chunk: u32,
        #[arg(long)]
        server: u32,
    },
    /// Make a caught-up learner a voter.
    Promote {
        #[arg(long)]
        chunk: u32,
        #[arg(long)]
        server: u32,
    },
    /// Remove a server from a chunk's group.
    Remove {
        #[arg(long)]
        chunk: u32,
        #[arg(long)]
        server: u32,
    },
    /// Compare every chunk's replicas block by block (version and checksum); exits 1 on any
    /// difference, or a group without exactly three voters.
    Scrub,
    /// Delete the data of replicas that were removed from their groups while their server was
    /// down.
    Gc,
}

const DEFAULT_METRICS_PORT: u16 = 9180;

fn default_profile_targets() -> Vec<String> {
    (0..=3).map(|k| format!("127.0.0.1:{}", DEFAULT_METRICS_PORT + k)).collect()
}

/// Keeps glibc's malloc from handing large buffers back to the kernel after each use. By
/// default a buffer above a (dynamic) threshold is mmapped and unmapped, and free memory at the
/// top of a heap is trimmed, so the frame and payload buffers of large writes (128 KiB and up)
/// came back as fresh pages, which the kernel zeroes on first touch: `clear_page` was ~8% of
/// the CPU under 128 KiB sequential writes. Memory kept is bounded by the peak in use.
/// Measured (fio 128 KiB sequential writes at iodepth 16, 2 interleaved runs each): 183 / 195
/// against 158 / 159 MiB/s, CPU per write 611 / 656 against 795 / 845 µs.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    tune_malloc();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log redirected to a file (as `local`'s usually is, and
        // its servers write into the same stderr) stays plain text for grep and editors.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("chunkserver: {e}");
        std::process::exit(1);
    }
}

fn engine(text: &str) -> Result<EngineKind, String> {
    text.parse()
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Cmd::Local {
            data_dir,
            bind,
            port,
            size,
            chunk_size,
            mode,
            io_engine,
            transport,
            peer_base_port,
            servers,
            tuning,
            metrics_port,
        } => {
            engine(&io_engine)?;
            let unix_sockets = match transport.as_str() {
                "unix" => true,
                "tcp" => false,
                other => return Err(format!("--transport {other:?}: want unix or tcp")),
            };
            let rebuild_rate = tuning.rebuild_rate_bytes()?;
            let max_sync_bytes = tuning.max_sync_bytes()?;
            let jitter = tuning.jitter()?;
            let poll = poll_window(tuning.poll_us)?;
            let Tuning { lbb_span, window, checkpoint_interval, .. } = tuning;
            if checkpoint_interval == 0 {
                return Err("--checkpoint-interval must be positive".into());
            }
            if servers.is_some_and(|n| n < 3) {
                return Err("--servers must be at least 3".into());
            }
            if let Some(m) = &mode {
                m.parse::<parallelraft::Mode>()?;
            }
            if lbb_span == 0 || window == 0 {
                return Err("--lbb-span and --window must be positive".into());
            }
            local::run(LocalOptions {
                data_dir,
                bind,
                port,
                size,
                chunk_size,
                mode,
                io_engine,
                unix_sockets,
                peer_base_port,
                lbb_span,
                window,
                jitter,
                rebuild_rate,
                checkpoint_interval,
                max_sync_bytes,
                poll,
                servers,
                metrics_port,
            })
        }
        Cmd::Serve { config, id, data_dir, io_engine, tick_ms, tuning, metrics } => {
            let rebuild_rate = tuning.rebuild_rate_bytes()?;
            let max_sync_bytes = tuning.max_sync_bytes()?;
            let jitter = tuning.jitter()?;
            let poll = poll_window(tuning.poll_us)?;
            let Tuning { lbb_span, window, checkpoint_interval, .. } = tuning;
            let cluster = Cluster::load(&config)?;
            let config_path = Some(config);
            if !data_dir.is_dir() {
                return Err(format!("data directory {} does not exist", data_dir.display()));
            }
            if lbb_span == 0 || window == 0 || tick_ms == 0 || checkpoint_interval == 0 {
                return Err("--lbb-span, --window, --tick-ms and --checkpoint-interval must be positive".into());
            }
            let storage = StorageOptions {
                engine: engine(&io_engine)?,
                wal_segment_bytes: 32 << 20,
                wal_direct: true,
                blocks_direct: false,
            };
            server::run(
                ServerOptions {
                    id: ReplicaId(id),
                    cluster,
                    data_dir,
                    storage,
                    tick: Duration::from_millis(tick_ms),
                    lbb_span,
                    window,
                    jitter,
                    metrics,
                    listen: None,
                    config_path,
                    rebuild_rate,
                    checkpoint_interval,
                    max_sync_bytes,
                    poll,
                },
                None,
            )
        }
        Cmd::Profile { metrics, svg } => chunkserver::profile::run(&metrics, &svg),
        Cmd::Admin { config, data_dir, command } => {
            let path = config.unwrap_or_else(|| data_dir.join("cluster.toml"));
            let cluster = Cluster::load(&path)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(admin(cluster, command))
        }
        Cmd::Nbd { config, bind, port, metrics, poll_us } => {
            let poll = poll_window(poll_us)?;
            let cluster = Cluster::load(&config)?;
            let addr: std::net::SocketAddr =
                format!("{bind}:{port}").parse().map_err(|_| format!("bad bind address {bind}:{port}"))?;
            let runtime = nbd::frontend_runtime(poll)?;
            runtime.block_on(async move {
                let listener = nbd::bind(addr).await?;
                let name = cluster.volume_name.clone();
                let volume = Volume::new(cluster);
                volume.watch(&config);
                volume.poll(poll);
                if let Some(a) = metrics {
                    volume.serve_metrics(a);
                }
                println!("{}", nbd::uri(addr, &name));
                nbd::log_ready(addr, &name);
                let export = Export { name, description: "parallelraft volume".into(), volume };
                tokio::select! {
                    _ = nbd::serve(listener, export) => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                Ok(())
            })
        }
    }
}

async fn admin(cluster: Cluster, command: AdminCmd) -> Result<(), String> {
    use chunkserver::admin::Admin;
    use parallelraft::MembershipChange;
    let check = |id: u32| {
        cluster
            .addr_of(ReplicaId(id))
            .map(|_| ReplicaId(id))
            .ok_or_else(|| format!("no server {id} in the cluster file"))
    };
    let check_chunk = |chunk: u32| {
        if chunk < cluster.chunk_count() {
            Ok(chunk)
        } else {
            Err(format!("no chunk {chunk}: the volume has {} chunks", cluster.chunk_count()))
        }
    };
    let admin = Admin::connect(cluster.clone()).await;
    let print_moves = |moves: Vec<(u32, chunkserver::admin::MoveReport)>, took: Duration| {
        let bytes: u64 = moves.iter().map(|(_, m)| m.rebuild_bytes).sum();
        let rebuild: f64 = moves.iter().map(|(_, m)| m.rebuild_time.as_secs_f64()).sum();
        println!(
            "moved {} replica(s) in {:.1} s: {:.1} MiB rebuilt at {:.1} MiB/s",
            moves.len(),
            took.as_secs_f64(),
            bytes as f64 / (1 << 20) as f64,
            if rebuild > 0.0 { bytes as f64 / (1 << 20) as f64 / rebuild } else { 0.0 }
        );
    };
    let start = std::time::Instant::now();
    match command {
        AdminCmd::Status => print!("{}", admin.status().await),
        AdminCmd::Decommission { server } => {
            let moves = admin.drain(check(server)?, None).await?;
            print_moves(moves, start.elapsed());
        }
        AdminCmd::Replace { server, with } => {
            let moves = admin.drain(check(server)?, Some(check(with)?)).await?;
            print_moves(moves, start.elapsed());
        }
        AdminCmd::Move { chunk, from, to } => {
            let report = admin.move_replica(check_chunk(chunk)?, check(from)?, check(to)?).await?;
            print_moves(vec![(chunk, report)], start.elapsed());
        }
        AdminCmd::AddLearner { chunk, server } => {
            admin.change(check_chunk(chunk)?, MembershipChange::AddLearner(check(server)?)).await?
        }
        AdminCmd::Promote { chunk, server } => {
            admin.change(check_chunk(chunk)?, MembershipChange::Promote(check(server)?)).await?
        }
        AdminCmd::Remove { chunk, server } => {
            let server = check(server)?;
            admin.change(check_chunk(chunk)?, MembershipChange::Remove(server)).await?;
            admin.retire(chunk, server).await;
        }
        AdminCmd::Scrub => {
            let (problems, summary) = admin.scrub().await;
            print!("{summary}");
            if !problems.is_empty() {
                return Err(format!("scrub found {} problem(s)", problems.len()));
            }
        }
        AdminCmd::Gc => println!("deleted {} removed replica(s)", admin.gc().await),
    }
    Ok(())
}
