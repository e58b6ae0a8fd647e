//! Where a chunk server listens, and the connections peers and frontends open to it: TCP
//! (`host:port`) or a unix socket (`unix:/path/to/sock`, or `unix:@name` in Linux's abstract
//! namespace, which needs no file and is freed when its process dies).
//!
//! Why unix sockets: servers on one host (`chunkserver local`) pay for loopback TCP on every
//! message, in the kernel's TCP stack and its soft interrupts, on both ends. A unix socket
//! hands the bytes over directly (measured on the 2-vCPU reference machine: fio reading 4 KiB
//! blocks at iodepth 32 from nbdkit, 113-117k IOPS over a unix socket against 87-96k over
//! 127.0.0.1; our frontend's CPU per read fell from 9.7-10.9 to 8.2-9.3 µs). The protocol does
//! not care: both are ordered, reliable byte streams, and a dead server's socket refuses
//! connections the way a closed port does.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{tcp, unix, TcpListener, TcpStream, UnixListener, UnixStream};

/// A chunk server's address, as the cluster file and the command line spell it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    /// A socket file.
    UnixPath(PathBuf),
    /// A name in the abstract namespace (written `unix:@name`).
    UnixAbstract(String),
}

/// Longest abstract name or socket path the kernel takes (`sun_path` is 108 bytes; a path
/// needs its terminating zero, an abstract name its leading one).
const MAX_UNIX_NAME_BYTES: usize = 107;

impl FromStr for ServerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<ServerAddr, String> {
        let Some(rest) = s.strip_prefix("unix:") else {
            return s.parse().map(ServerAddr::Tcp).map_err(|_| {
                format!("bad address {s:?} (want host:port, unix:/path/to/socket or unix:@abstract-name)")
            });
        };
        if let Some(name) = rest.strip_prefix('@') {
            if name.is_empty() || name.len() > MAX_UNIX_NAME_BYTES - 1 || name.contains('\0') {
                return Err(format!("bad abstract socket name in {s:?} (1 to 106 bytes, no NUL)"));
            }
            return Ok(ServerAddr::UnixAbstract(name.to_owned()));
        }
        if rest.is_empty() || rest.len() > MAX_UNIX_NAME_BYTES || rest.contains('\0') {
            return Err(format!("bad socket path in {s:?} (1 to 107 bytes, no NUL)"));
        }
        Ok(ServerAddr::UnixPath(PathBuf::from(rest)))
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Tcp(a) => write!(f, "{a}"),
            ServerAddr::UnixPath(p) => write!(f, "unix:{}", p.display()),
            ServerAddr::UnixAbstract(n) => write!(f, "unix:@{n}"),
        }
    }
}

fn abstract_addr(name: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// A connection to or from a chunk server.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `addr` (TCP without Nagle: frames are batched by the sender already).
    pub async fn connect(addr: &ServerAddr) -> io::Result<Stream> {
        match addr {
            ServerAddr::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            ServerAddr::UnixPath(p) => Ok(Stream::Unix(UnixStream::connect(p).await?)),
            ServerAddr::UnixAbstract(name) => {
                // A unix connect completes at once (or fails: nobody listens, or the backlog
                // is full), so the blocking call does not stall the runtime.
                let s = std::os::unix::net::UnixStream::connect_addr(&abstract_addr(name)?)?;
                s.set_nonblocking(true)?;
                Ok(Stream::Unix(UnixStream::from_std(s)?))
            }
        }
    }

    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), WriteHalf::Unix(w))
            }
        }
    }
}

/// The reading half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            ReadHalf::Unix(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// The writing half of a [`Stream`].
#[derive(Debug)]
pub enum WriteHalf {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
}

impl WriteHalf {
    /// A non-blocking vectored write of what the socket takes now (`WouldBlock` if nothing).
    /// At most `IOV_MAX` (1024) slices.
    pub fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            WriteHalf::Tcp(w) => w.try_write_vectored(bufs),
            WriteHalf::Unix(w) => w.try_write_vectored(bufs),
        }
    }

    /// Waits until the socket may take bytes.
    pub async fn writable(&self) -> io::Result<()> {
        match self {
            WriteHalf::Tcp(w) => w.writable().await,
            WriteHalf::Unix(w) => w.writable().await,
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            WriteHalf::Unix(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    /// Both kinds of socket take a vector in one writev (the default would write only the
    /// first buffer of it a call).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteHalf::Unix(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            WriteHalf::Tcp(w) => w.is_write_vectored(),
            WriteHalf::Unix(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_flush(cx),
            WriteHalf::Unix(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            WriteHalf::Unix(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// A chunk server's listening socket, bound before the runtime starts (so a busy address is
/// a start-up error) and registered with the runtime by [`Listener::into_tokio`].
pub enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl StdListener {
    /// Binds `addr`. A socket file left by a server that died is replaced; one that still
    /// accepts connections belongs to a live server, and binding fails as for a busy port.
    pub fn bind(addr: &ServerAddr) -> io::Result<StdListener> {
        let listener = match addr {
            ServerAddr::Tcp(a) => StdListener::Tcp(std::net::TcpListener::bind(a)?),
            ServerAddr::UnixPath(p) => {
                if std::os::unix::net::UnixStream::connect(p).is_ok() {
                    return Err(io::Error::new(io::ErrorKind::AddrInUse, "a live server listens on this socket"));
                }
                match std::fs::symlink_metadata(p) {
                    Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => std::fs::remove_file(p)?,
                    Ok(_) => {
                        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the path exists and is not a socket"))
                    }
                    Err(_) => {}
                }
                StdListener::Unix(std::os::unix::net::UnixListener::bind(p)?)
            }
            ServerAddr::UnixAbstract(name) => {
                StdListener::Unix(std::os::unix::net::UnixListener::bind_addr(&abstract_addr(name)?)?)
            }
        };
        match &listener {
            StdListener::Tcp(l) => l.set_nonblocking(true)?,
            StdListener::Unix(l) => l.set_nonblocking(true)?,
        }
        Ok(listener)
    }

    /// Registers the socket with the current tokio runtime.
    pub fn into_tokio(self) -> io::Result<Listener> {
        Ok(match self {
            StdListener::Tcp(l) => Listener::Tcp(TcpListener::from_std(l)?),
            StdListener::Unix(l) => Listener::Unix(UnixListener::from_std(l)?),
        })
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// The next connection, and who it is from (for logs).
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, from) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), from.to_string()))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), "a unix socket peer".into()))
            }
        }
    }
}

/// A base port `b` with `b..b + n` all free on 127.0.0.1 when checked, for test clusters and
/// benchmark targets that need ports no one configured.
///
/// Chosen *below* the kernel's ephemeral range (`ip_local_port_range`), at a random place:
/// outgoing connections (peer links, fio, `nbdinfo`) take their local ports from that range,
/// so a port chosen inside it can be taken by some `connect` between this check and the
/// server's own `bind`. A CI run lost a chunk server that way (`Address already in use` on a
/// port that `bind(0)` had offered a moment before). Outside the range only an explicit `bind`
/// can take it, and the random start keeps parallel callers apart.
pub fn free_port_run(n: u16) -> Result<u16, String> {
    const LOWEST: u32 = 10_000;
    let (eph_low, eph_high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut f = t.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some((f.next()??, f.next()??))
        })
        .unwrap_or((32_768, 60_999));
    let n = u32::from(n.max(1));
    // Candidate intervals of base ports: below the range, else above it.
    let below = (LOWEST, eph_low.saturating_sub(n));
    let above = (eph_high + 1, 65_536u32.saturating_sub(n));
    let span = [below, above].into_iter().find(|(lo, hi)| hi > lo);
    let Some((lo, hi)) = span else {
        return Err(format!("no room for {n} ports outside the ephemeral range {eph_low}-{eph_high}"));
    };
    for attempt in 0..500u64 {
        let base = lo + (crate::process_entropy(attempt) % u64::from(hi - lo)) as u32;
        let all_free = (base..base + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p as u16)).is_ok());
        if all_free {
            return Ok(base as u16);
        }
    }
    Err(format!("no {n} consecutive free ports in {lo}-{hi}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn addresses_parse_and_print_back() {
        for text in ["127.0.0.1:20001", "[::1]:7", "unix:/run/cs/1.sock", "unix:@parallelraft-7-1"] {
            let addr: ServerAddr = text.parse().unwrap();
            assert_eq!(addr.to_string(), text);
        }
        assert_eq!("unix:@x".parse::<ServerAddr>().unwrap(), ServerAddr::UnixAbstract("x".into()));
        for bad in ["localhost", "127.0.0.1", "unix:", "unix:@", "tcp:1.2.3.4:5"] {
            let e = bad.parse::<ServerAddr>().unwrap_err();
            assert!(e.contains("bad"), "{bad}: {e}");
        }
        let long = format!("unix:/{}", "d".repeat(107));
        assert!(long.parse::<ServerAddr>().is_err(), "longer than sun_path");
        assert!(format!("unix:@{}", "n".repeat(107)).parse::<ServerAddr>().is_err());
    }

    /// Bytes cross each kind of socket both ways.
    async fn round_trip(addr: ServerAddr) {
        let listener = StdListener::bind(&addr).unwrap().into_tokio().unwrap();
        let client = tokio::spawn({
            let addr = addr.clone();
            async move {
                let (mut r, mut w) = Stream::connect(&addr).await.unwrap().into_split();
                w.write_all(b"ping").await.unwrap();
                let mut got = [0u8; 4];
                r.read_exact(&mut got).await.unwrap();
                got
            }
        });
        let (stream, _) = listener.accept().await.unwrap();
        let (mut r, w) = stream.into_split();
        let mut got = [0u8; 4];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        w.writable().await.unwrap();
        let pieces = [io::IoSlice::new(b"po"), io::IoSlice::new(b"ng")];
        assert_eq!(w.try_write_vectored(&pieces).unwrap(), 4);
        assert_eq!(&client.await.unwrap(), b"pong");
    }

    #[tokio::test]
    async fn tcp_and_unix_sockets_carry_bytes() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        round_trip(ServerAddr::Tcp(tcp)).await;
        let dir = tempfile::tempdir().unwrap();
        round_trip(ServerAddr::UnixPath(dir.path().join("s.sock"))).await;
        round_trip(ServerAddr::UnixAbstract(format!("parallelraft-test-{}", std::process::id()))).await;
    }

    #[test]
    fn a_stale_socket_file_is_replaced_a_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let addr = ServerAddr::UnixPath(dir.path().join("s.sock"));
        let live = StdListener::bind(&addr).unwrap();
        let e = StdListener::bind(&addr).err().expect("a live server holds it");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(live); // the file stays behind, as after a crash
        assert!(dir.path().join("s.sock").exists());
        StdListener::bind(&addr).expect("stale file replaced");
        let file = ServerAddr::UnixPath(dir.path().join("plain"));
        std::fs::write(dir.path().join("plain"), b"data").unwrap();
        assert!(StdListener::bind(&file).is_err(), "a regular file is never removed");
        assert_eq!(std::fs::read(dir.path().join("plain")).unwrap(), b"data");
        let name = ServerAddr::UnixAbstract(format!("parallelraft-busy-{}", std::process::id()));
        let _held = StdListener::bind(&name).unwrap();
        assert!(StdListener::bind(&name).is_err(), "an abstract name is held while its socket lives");
    }

    #[test]
    fn free_port_runs_lie_outside_the_ephemeral_range_and_bind() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let mut f = range.split_whitespace().map(|v| v.parse::<u16>().unwrap());
        let (low, high) = (f.next().unwrap(), f.next().unwrap());
        for _ in 0..20 {
            let base = free_port_run(8).unwrap();
            assert!(base + 7 < low || base > high, "{base} within {low}-{high}");
            let held: Vec<_> =
                (base..base + 8).map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).unwrap()).collect();
            assert_eq!(held.len(), 8);
        }
    }
}
