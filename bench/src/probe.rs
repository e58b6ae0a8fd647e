//! How fast the host is just before a job: a fixed piece of CPU work and a few durable 4 KiB
//! writes, timed.
//!
//! Why: steal time (see [`crate::host`]) does not show every slowdown of the shared host. In
//! one same-run comparison `nbdkit memory` went from 8 to 14 µs of CPU per 4 KiB write across
//! three runs at 0-3% steal, and the disk's write + fdatasync went from ~57 µs (the machine's
//! reference) to a p50 of 175 µs on another day. A target measured in a slow minute then
//! looks slow. Both probes run right before every job (they take a few tens of ms), so each
//! run's figures carry what the host gave it, and two runs' ratios can be told apart from a
//! change of the host.
//!
//! The CPU work mixes what the targets spend their CPU on: arithmetic, copies through memory
//! larger than a core's caches, and system calls. The disk probe is what a durable engine
//! waits for: a 4 KiB write and an fdatasync, into a file of the work directory.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use crate::fio::median_of;

/// What the probes measured before one job.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Probe {
    /// Median time of [`CPU_REPEATS`] runs of the fixed CPU work, µs (see [`cpu_work`]).
    pub cpu_us: f64,
    /// Median latency of [`FLUSH_WRITES`] writes of 4 KiB each followed by fdatasync, µs
    /// (`NaN` when the work directory refused the file).
    pub flush_us: f64,
}

/// Runs of the CPU work; the median is reported (one preempted run does not move it).
pub const CPU_REPEATS: usize = 5;
/// Durable writes of the disk probe.
pub const FLUSH_WRITES: usize = 32;
/// Bytes copied by one run of the CPU work: 8 MiB, larger than this machine's caches.
const COPY_BYTES: usize = 8 << 20;

/// Both probes; the disk probe writes a scratch file in `dir` and removes it.
pub fn probe(dir: &Path) -> Probe {
    Probe { cpu_us: cpu_probe_us(), flush_us: flush_probe_us(dir).unwrap_or(f64::NAN) }
}

/// The median time of the fixed CPU work, µs.
pub fn cpu_probe_us() -> f64 {
    let mut from = vec![1u8; COPY_BYTES];
    let mut to = vec![0u8; COPY_BYTES];
    let times: Vec<f64> = (0..CPU_REPEATS)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(cpu_work(&mut from, &mut to));
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    median_of(times)
}

/// The fixed work: 200,000 rounds of a xorshift generator, two copies of `from` into `to`
/// (every byte read and written), and 2,000 system calls. Returns a value that depends on
/// all of it, so the compiler cannot drop any.
fn cpu_work(from: &mut [u8], to: &mut [u8]) -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    for round in 0..2 {
        to.copy_from_slice(from);
        from[round] ^= to[to.len() - 1 - round];
    }
    for _ in 0..2_000 {
        // SAFETY: getppid has no arguments and cannot fail.
        x = x.wrapping_add(unsafe { libc::getppid() } as u64);
    }
    x ^ u64::from(to[to.len() / 2])
}

/// The median latency of [`FLUSH_WRITES`] durable 4 KiB writes into a scratch file in `dir`,
/// µs.
pub fn flush_probe_us(dir: &Path) -> std::io::Result<f64> {
    let path = dir.join(format!(".bench-probe-{}", std::process::id()));
    let result = (|| {
        let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
        let block = [0x5Au8; 4096];
        let mut times = Vec::with_capacity(FLUSH_WRITES);
        for k in 0..FLUSH_WRITES {
            let start = Instant::now();
            file.write_all_at(&block, (k as u64) * 4096)?;
            file.sync_data()?;
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
        Ok(median_of(times))
    })();
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_work_depends_on_every_part_and_takes_time() {
        let (mut a, mut b) = (vec![1u8; 4096], vec![0u8; 4096]);
        let one = cpu_work(&mut a, &mut b);
        assert!(b[2..].iter().all(|&x| x == 1) && a[2..] == b[2..], "the copy happened");
        let (mut c, mut d) = (vec![2u8; 4096], vec![0u8; 4096]);
        assert_ne!(cpu_work(&mut c, &mut d), one, "the result depends on the copied bytes");
        let us = cpu_probe_us();
        assert!(us.is_finite() && us > 0.0, "{us}");
    }

    #[test]
    fn the_flush_probe_measures_durable_writes_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let us = flush_probe_us(dir.path()).unwrap();
        assert!(us.is_finite() && us > 0.0, "{us}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the scratch file is removed");
        let missing = dir.path().join("no-such-dir");
        assert!(flush_probe_us(&missing).is_err());
        let p = probe(&missing);
        assert!(p.flush_us.is_nan() && p.cpu_us > 0.0, "{p:?}");
    }
}
