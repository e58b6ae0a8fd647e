//! What the host took from this VM during a job (the steal time of `/proc/stat`), and the CPU
//! time a target's processes spent on it (`/proc/PID/stat`).
//!
//! Why: on a shared host the hypervisor may run other guests on this VM's vCPUs. It showed as
//! 36-54% steal while the engine ran (its many threads sleep and wake) and as a few per cent
//! under two busy loops, so the same commit measured far apart on two days. Recording the
//! steal of every job lets a reader tell a slow engine from a slow host. Stolen ticks are not
//! charged to a process, so the CPU time per operation of a target that does not poll moves
//! far less with the host than its IOPS do; a polling one (the engine) spends whatever is
//! idle, and its figure includes the spinning.

/// The machine-wide CPU counters of `/proc/stat` (its first line), in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + idle + iowait + irq + softirq + steal (guest time is part of
    /// user already).
    pub total: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// Parses the text of `/proc/stat`; `None` without an aggregate `cpu` line.
    pub fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let fields: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
        // Kernels before 2.6.11 have no steal column: count it as none.
        let total = fields.iter().take(8).sum();
        Some(CpuTimes { total, steal: fields.get(7).copied().unwrap_or(0) })
    }

    /// Now, or `None` where `/proc/stat` cannot be read.
    pub fn now() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The per cent of all CPU time between `self` and `later` the host stole (`NaN` when no
    /// time passed or the counters went back).
    pub fn steal_pct(&self, later: &CpuTimes) -> f64 {
        match (later.total.checked_sub(self.total), later.steal.checked_sub(self.steal)) {
            (Some(total), Some(steal)) if total > 0 => 100.0 * steal as f64 / total as f64,
            _ => f64::NAN,
        }
    }
}

/// Clock ticks a second of `/proc` CPU times (`USER_HZ`: 100 on every Linux architecture
/// this runs on; `sysconf(_SC_CLK_TCK)` says so).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the C library.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (parent pid, user + system ticks of all its threads) from the text of `/proc/PID/stat`.
/// The command name (field 2) may hold spaces and parentheses: fields are counted after its
/// last `)`.
fn parse_proc_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (3), ppid (4), ..., utime (14), stime (15).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU seconds that `root` and every process descended from it have spent so far (their
/// threads included; `None` if `root` is gone). A process that exited in between is not
/// counted: the targets' processes live as long as the target.
pub fn tree_cpu_seconds(root: u32) -> Option<f64> {
    let mut procs: Vec<(u32, u32, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some((ppid, ticks)) =
            std::fs::read_to_string(entry.path().join("stat")).ok().as_deref().and_then(parse_proc_stat)
        {
            procs.push((pid, ppid, ticks));
        }
    }
    Some(tree_ticks(root, &procs)? as f64 / ticks_per_second())
}

/// µs of CPU per operation: `cpu_s` CPU seconds spent over `wall_s` seconds at `iops`
/// (`NaN` when any is unknown or the job did nothing).
pub fn cpu_us_per_op(cpu_s: Option<f64>, wall_s: f64, iops: f64) -> f64 {
    match cpu_s {
        Some(cpu) if cpu >= 0.0 && wall_s > 0.0 && iops > 0.0 => cpu / wall_s / iops * 1e6,
        _ => f64::NAN,
    }
}

/// The ticks of `root` and its descendants among `procs` (pid, ppid, ticks).
fn tree_ticks(root: u32, procs: &[(u32, u32, u64)]) -> Option<u64> {
    let mut total = procs.iter().find(|p| p.0 == root)?.2;
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid, ticks) in procs {
            if ppid == parent && pid != root {
                total += ticks;
                frontier.push(pid);
            }
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_trees_cpu_is_its_own_and_its_descendants() {
        // A name with a space and a parenthesis; utime 7, stime 5.
        let stat = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 100 1000 10";
        assert_eq!(parse_proc_stat(stat), Some((1, 12)));
        assert_eq!(parse_proc_stat("42 (cut) S 1 2"), None);
        // 10 <- 11 <- 13, and 12 elsewhere.
        let procs = [(10, 1, 5), (11, 10, 7), (12, 1, 100), (13, 11, 2)];
        assert_eq!(tree_ticks(10, &procs), Some(14));
        assert_eq!(tree_ticks(11, &procs), Some(9));
        assert_eq!(tree_ticks(99, &procs), None);
        // This test's own process is there, and its count does not go back.
        let me = std::process::id();
        let a = tree_cpu_seconds(me).unwrap();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        assert!(tree_cpu_seconds(me).unwrap() >= a);
        // 3 CPU seconds over 10 s at 2,000 IOPS: 150 µs an operation.
        assert!((cpu_us_per_op(Some(3.0), 10.0, 2000.0) - 150.0).abs() < 1e-9);
        assert!(cpu_us_per_op(None, 10.0, 2000.0).is_nan());
        assert!(cpu_us_per_op(Some(3.0), 10.0, 0.0).is_nan());
        assert!(cpu_us_per_op(Some(-1.0), 10.0, 5.0).is_nan(), "a count that went back");
    }

    #[test]
    fn steal_is_a_share_of_all_cpu_time_between_two_readings() {
        let before =
            CpuTimes::parse("cpu  100 0 50 800 20 0 10 20 0 0\ncpu0 50 0 25 400 10 0 5 10 0 0\nintr 1 2 3\n").unwrap();
        assert_eq!(before, CpuTimes { total: 1000, steal: 20 });
        let after = CpuTimes::parse("cpu  200 0 100 1400 40 0 20 240 0 0\n").unwrap();
        // 1000 ticks passed, 220 of them stolen.
        assert!((before.steal_pct(&after) - 22.0).abs() < 1e-9);
        assert!(after.steal_pct(&before).is_nan(), "counters never go back");
        assert!(before.steal_pct(&before).is_nan(), "no time passed");
        assert_eq!(CpuTimes::parse("cpu  1 2 3 4\n"), Some(CpuTimes { total: 10, steal: 0 }), "no steal column");
        assert_eq!(CpuTimes::parse("cpu0 1 2 3\n"), None, "only the aggregate line counts");
        assert_eq!(CpuTimes::parse("cpu  1 x 3\n"), None);
        assert!(CpuTimes::now().is_some(), "this is Linux");
    }
}
