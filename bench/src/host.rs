//! What the host took from this VM during a job: the steal time of `/proc/stat`.
//!
//! Why: on a shared host the hypervisor may run other guests on this VM's vCPUs. It showed as
//! 36-54% steal while the engine ran (its many threads sleep and wake) and as a few per cent
//! under two busy loops, so the same commit measured far apart on two days. Recording the
//! steal of every job lets a reader tell a slow engine from a slow host.

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

#[cfg(test)]
mod tests {
    use super::*;

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
