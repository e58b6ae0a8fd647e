//! `chunkserver`: run a chunk server, an NBD frontend, or a whole local cluster.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use parallelraft::ReplicaId;

use chunkserver::config::Cluster;
use chunkserver::local::{self, LocalOptions};
use chunkserver::nbd::{self, Export};
use chunkserver::server::group::StorageOptions;
use chunkserver::server::{self, ServerOptions, DEFAULT_LBB_SPAN};
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
    /// Look-behind span N: each entry carries the ranges of its N predecessors, and a chunk
    /// has up to N + 1 writes in flight past its committed watermark.
    #[arg(long, default_value_t = DEFAULT_LBB_SPAN)]
    lbb_span: usize,
    /// Benchmarks only: delay every message between chunk servers by a random 0..=N µs (1 ms
    /// resolution), which reorders them.
    #[arg(long, default_value_t = 0)]
    jitter_us: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local three-replica cluster and serve its volume over NBD (Ctrl-C stops it).
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
        #[arg(long, default_value = "auto")]
        io_engine: String,
        /// First of the three chunk servers' ports.
        #[arg(long, default_value_t = 20101)]
        peer_base_port: u16,
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
        #[arg(long, default_value = "auto")]
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
    },
    /// Print where a write's time goes (p50 / p99 per stage) from the `/metrics` of a running
    /// cluster, and draw it as an SVG picture.
    Profile {
        /// The `/metrics` addresses (default: a `local` cluster's frontend and three servers).
        #[arg(long, value_delimiter = ',', default_values_t = default_profile_targets())]
        metrics: Vec<String>,
        /// Write the picture here.
        #[arg(long, default_value = "profile.svg")]
        svg: PathBuf,
    },
}

const DEFAULT_METRICS_PORT: u16 = 9180;

fn default_profile_targets() -> Vec<String> {
    (0..=3).map(|k| format!("127.0.0.1:{}", DEFAULT_METRICS_PORT + k)).collect()
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
            peer_base_port,
            tuning: Tuning { lbb_span, jitter_us },
            metrics_port,
        } => {
            engine(&io_engine)?;
            if let Some(m) = &mode {
                m.parse::<parallelraft::Mode>()?;
            }
            if lbb_span == 0 {
                return Err("--lbb-span must be positive".into());
            }
            local::run(LocalOptions {
                data_dir,
                bind,
                port,
                size,
                chunk_size,
                mode,
                io_engine,
                peer_base_port,
                lbb_span,
                jitter_us,
                metrics_port,
            })
        }
        Cmd::Serve { config, id, data_dir, io_engine, tick_ms, tuning: Tuning { lbb_span, jitter_us }, metrics } => {
            let cluster = Cluster::load(&config)?;
            if !data_dir.is_dir() {
                return Err(format!("data directory {} does not exist", data_dir.display()));
            }
            if lbb_span == 0 || tick_ms == 0 {
                return Err("--lbb-span and --tick-ms must be positive".into());
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
                    jitter: Duration::from_micros(jitter_us),
                    metrics,
                    listen: None,
                },
                None,
            )
        }
        Cmd::Profile { metrics, svg } => chunkserver::profile::run(&metrics, &svg),
        Cmd::Nbd { config, bind, port, metrics } => {
            let cluster = Cluster::load(&config)?;
            let addr: std::net::SocketAddr =
                format!("{bind}:{port}").parse().map_err(|_| format!("bad bind address {bind}:{port}"))?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let listener = nbd::bind(addr).await?;
                let name = cluster.volume_name.clone();
                let volume = Volume::new(cluster);
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
