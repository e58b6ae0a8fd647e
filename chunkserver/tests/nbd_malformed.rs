//! Malformed NBD input against a real server: every bad option, request and handshake gets
//! the spec's answer (an error reply, or a closed connection where the spec says so), never
//! a panic or a hang, and the server keeps serving.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const ERR_UNSUP: u32 = (1 << 31) + 1;
const ERR_INVALID: u32 = (1 << 31) + 3;
const ERR_UNKNOWN: u32 = (1 << 31) + 6;
const ERR_TOO_BIG: u32 = (1 << 31) + 9;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

struct Client {
    s: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client { s }
    }

    fn greet(port: u16) -> Client {
        let mut c = Client::connect(port);
        let mut hello = [0u8; 18];
        c.s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(hello[8..16].try_into().unwrap()), IHAVEOPT);
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// (option, reply type, data)
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).unwrap();
        (u32::from_be_bytes(h[8..12].try_into().unwrap()), u32::from_be_bytes(h[12..16].try_into().unwrap()), data)
    }

    fn go(&mut self) {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"vol0");
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d);
        loop {
            let (_, kind, _) = self.reply();
            if kind == REP_ACK {
                return;
            }
            assert_eq!(kind, REP_INFO);
        }
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&b).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// Simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn malformed_nbd_input_gets_the_specs_answers() {
    let _g = serial();
    let c = LocalCluster::start("parallel", "64M");
    let port = c.port;
    let size = 64u64 << 20;

    // Options: unknown → UNSUP and parsing goes on; LIST; malformed and unknown-export INFO;
    // STRUCTURED_REPLY with data → INVALID.
    let mut k = Client::greet(port);
    k.option(99, b"whatever");
    assert_eq!(k.reply().1, ERR_UNSUP);
    k.option(10, &[0u8; 8]); // SET_META_CONTEXT: unsupported
    assert_eq!(k.reply().1, ERR_UNSUP);
    k.option(3, &[]);
    let (_, kind, data) = k.reply();
    assert_eq!(kind, REP_SERVER);
    assert_eq!(&data[4..], b"vol0");
    assert_eq!(k.reply().1, REP_ACK);
    k.option(6, &[0, 0, 0, 9, b'v']); // name length beyond the data
    assert_eq!(k.reply().1, ERR_INVALID);
    let mut d = 5u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nope!");
    d.extend_from_slice(&0u16.to_be_bytes());
    k.option(6, &d);
    assert_eq!(k.reply().1, ERR_UNKNOWN);
    k.option(8, b"x");
    assert_eq!(k.reply().1, ERR_INVALID);
    k.go();

    // Requests: each bad one gets its errno and the connection goes on.
    k.request(0, 1, 1, 100, 512, &[0u8; 512]); // unaligned write
    assert_eq!(k.simple(), (EINVAL, 1));
    k.request(0, 1, 2, size - 512, 1024, &[0u8; 1024]); // write past the end
    assert_eq!(k.simple(), (ENOSPC, 2));
    k.request(0, 0, 3, size, 512, &[]); // read past the end
    assert_eq!(k.simple(), (EINVAL, 3));
    k.request(0, 42, 4, 0, 512, &[]); // unknown command
    assert_eq!(k.simple(), (EINVAL, 4));
    k.request(1 << 9, 0, 5, 0, 512, &[]); // unknown flag
    assert_eq!(k.simple(), (EINVAL, 5));
    k.request(0, 0, 6, 0, 0, &[]); // zero-length read
    assert_eq!(k.simple(), (EINVAL, 6));
    k.request(0, 4, 7, u64::MAX - 511, 512, &[]); // trim whose end overflows
    assert_eq!(k.simple(), (ENOSPC, 7));
    let oversize = (32 << 20) + 4096;
    k.request(0, 1, 8, 0, oversize, &vec![0u8; oversize as usize]); // beyond the advertised maximum
    assert_eq!(k.simple(), (EOVERFLOW, 8));
    // Still in sync: a real write and read.
    k.request(1, 1, 9, 4096, 4096, &[0x5a; 4096]);
    assert_eq!(k.simple(), (0, 9));
    k.request(0, 0, 10, 4096, 4096, &[]);
    assert_eq!(k.simple(), (0, 10));
    let mut back = vec![0u8; 4096];
    k.s.read_exact(&mut back).unwrap();
    assert!(back.iter().all(|b| *b == 0x5a));
    k.request(0, 3, 11, 0, 0, &[]); // flush
    assert_eq!(k.simple(), (0, 11));
    // A bad request magic ends the connection (the stream cannot be trusted).
    k.s.write_all(&[0u8; 28]).unwrap();
    assert!(k.closed());

    // Handshake violations close the connection.
    let mut k = Client::connect(port);
    let mut hello = [0u8; 18];
    k.s.read_exact(&mut hello).unwrap();
    k.s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap(); // unknown client flag
    assert!(k.closed());
    let mut k = Client::greet(port);
    k.s.write_all(&[0x11; 16]).unwrap(); // bad option magic
    assert!(k.closed());
    let mut k = Client::greet(port);
    k.option(6, &vec![0u8; 100 << 10]); // option too large
    assert_eq!(k.reply().1, ERR_TOO_BIG);
    assert!(k.closed());
    let mut k = Client::greet(port);
    k.option(1, b"nope"); // EXPORT_NAME of an unknown export: hard disconnect
    assert!(k.closed());
    // Truncated handshakes: the client goes away mid-way.
    for cut in [0usize, 3, 10] {
        let mut k = Client::greet(port);
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&7u32.to_be_bytes());
        k.s.write_all(&b[..cut.min(b.len())]).unwrap();
        drop(k);
    }
    // A client that never finishes the handshake is cut off by the time limit.
    let mut k = Client::greet(port);
    let started = Instant::now();
    assert!(k.closed());
    assert!(started.elapsed() >= Duration::from_secs(5), "closed too early");

    // EXPORT_NAME (old style) works, then DISC.
    let mut k = Client::greet(port);
    k.option(1, b"vol0");
    let mut info = [0u8; 10];
    k.s.read_exact(&mut info).unwrap();
    assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), size);
    k.request(0, 2, 12, 0, 0, &[]);
    assert!(k.closed());

    // The server survived all of it.
    let mut k = Client::greet(port);
    k.go();
    k.request(0, 0, 13, 0, 512, &[]);
    assert_eq!(k.simple(), (0, 13));
}
