//! Adaptive polling: a thread that had work a moment ago keeps looking for more instead of
//! going to sleep.
//!
//! Why: on this class of machine (2 vCPUs, no guest halt polling; see the shared machine
//! limits) a thread asleep on one vCPU and woken from the other costs ~30 µs each way, paid
//! by both sides (the waker's inter-processor interrupt, the sleeper's return from halt). A
//! write at iodepth 1 crosses about eight such hand-offs (client, frontend, leader, follower
//! and back), a read four. PolarFS avoids them the same way: its I/O threads poll.
//!
//! Contract: [`Activity::touch`] marks work (a frame read, a completion queued). A poller
//! spins only within its window after the last touch, and every round without a new touch
//! first yields the vCPU to any other runnable thread (`sched_yield`), so a spinner does not
//! hold a core someone else is waiting for; after a quiet window it sleeps until the next
//! touch. A runtime's poller skips that yield in a round that follows a touch: the task the
//! work woke may be queued behind the poller, and the yield would put a round of every other
//! spinner of the vCPU between the two. A window of zero never spins.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Default of `--poll-us`: longer than a whole write at iodepth 1 (~0.5 ms here), so the
/// frontend, which hears nothing between a request and its answer, and a follower, which
/// hears nothing between two appends, stay awake through it. Measured (fio 4 KiB, fresh
/// `local` per run, `--poll-us 0` / 250 / 1000, two interleaved runs each): writes at
/// iodepth 1 p50 610-627 / 537-561 / 473-477 µs, reads at iodepth 1 p50 138-153 / 58-60 /
/// 47-53 µs; at iodepth 32 (five runs of 0 and 1000) writes 7.6-9.4k against 6.8-8.6k IOPS,
/// reads 37-49k against 45-57k. The cost: an idle local cluster (heartbeats only) takes 3.8
/// / 6.2 / 14.6% of one core.
pub const DEFAULT_POLL_US: u64 = 1000;

/// When a process (or one of its threads) last had work.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    /// One more than the microseconds after `origin` of the last touch; 0: never touched.
    last_us: AtomicU64,
    /// Touches so far.
    touches: AtomicU64,
    wake: Notify,
    /// Spin rounds that offered the vCPU so far (all pollers of this activity).
    spins: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            origin: Instant::now(),
            last_us: AtomicU64::new(0),
            touches: AtomicU64::new(0),
            wake: Notify::new(),
            spins: AtomicU64::new(0),
        })
    }

    /// Marks work now, and wakes a sleeping runtime poller.
    pub fn touch(&self) {
        self.last_us.store(self.now_us() + 1, Ordering::Relaxed);
        self.touches.fetch_add(1, Ordering::Relaxed);
        // A permit is stored if the poller is not waiting: its next wait returns at once.
        self.wake.notify_one();
    }

    /// Whether the last touch lies within `window`.
    pub fn recent(&self, window: Duration) -> bool {
        match self.last_us.load(Ordering::Relaxed) {
            0 => false,
            last => (self.now_us() + 1).saturating_sub(last) < window.as_micros() as u64,
        }
    }

    /// Touches so far.
    pub fn touches(&self) -> u64 {
        self.touches.load(Ordering::Relaxed)
    }

    /// Spin rounds that offered the vCPU so far.
    pub fn spins(&self) -> u64 {
        self.spins.load(Ordering::Relaxed)
    }

    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    /// One spin round: lets any runnable thread of this vCPU go first.
    pub fn spin_once(&self) {
        self.spins.fetch_add(1, Ordering::Relaxed);
        yield_cpu();
    }
}

/// Lets any other runnable thread of this vCPU go first (a spinning thread's courtesy).
pub fn yield_cpu() {
    // SAFETY: sched_yield takes no arguments and only reschedules the calling thread.
    unsafe {
        libc::sched_yield();
    }
}

/// Keeps the current thread's tokio runtime (a current-thread one) from sleeping within
/// `window` after each touch of `activity`: a task that yields to the OS and to tokio in
/// turn, so that ready tasks run and the I/O driver is polled (without blocking) every
/// [`EVENT_INTERVAL`] rounds. Nothing is spawned for a zero window. Call inside the runtime.
pub fn spawn_runtime_poller(activity: Arc<Activity>, window: Duration) {
    if window.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut seen = activity.touches();
        loop {
            if activity.recent(window) {
                // Work arrived since the last round: a task it woke (the core behind a frame's
                // reader, a socket's writer behind a request) may still be queued behind this
                // one in the runtime's round, so it runs first, without a round of every other
                // spinning thread of this vCPU (~15 µs) before it.
                let touches = activity.touches();
                if touches == seen {
                    activity.spin_once();
                }
                seen = touches;
                tokio::task::yield_now().await;
            } else {
                activity.wake.notified().await;
            }
        }
    });
}

/// Offers the vCPU to other runnable threads once for this round of a polling runtime: the
/// runtime's poller (see [`spawn_runtime_poller`]) does it while it spins, so this does it
/// only when that poller does not (a second offer per round doubles the `sched_yield`s and
/// context switches). For a task that goes round without sleeping; it still yields to tokio.
pub async fn yield_round(activity: &Activity, window: Duration) {
    if !activity.recent(window) {
        yield_cpu();
    }
    tokio::task::yield_now().await;
}

/// Tasks a polling current-thread runtime runs between looks at its sockets and timers
/// (tokio's default, 61, would leave a frame waiting behind 61 spin rounds).
pub const EVENT_INTERVAL: u32 = 8;

/// A current-thread runtime, polling its sockets more often when it will spin.
pub fn current_thread_runtime(window: Duration) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    if !window.is_zero() {
        builder.event_interval(EVENT_INTERVAL);
    }
    builder.enable_all().build().map_err(|e| format!("tokio runtime: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_only_within_the_window_after_a_touch() {
        let window = Duration::from_millis(200);
        let runtime = current_thread_runtime(window).unwrap();
        let activity = Activity::new();
        runtime.block_on(async {
            spawn_runtime_poller(activity.clone(), window);
            // Never touched: the poller sleeps.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(activity.spins(), 0, "spun without any work");
            activity.touch();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let after_touch = activity.spins();
            assert!(after_touch > 0, "did not spin after a touch");
            // Quiet for longer than the window: it stops.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let settled = activity.spins();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(activity.spins(), settled, "kept spinning after a quiet window");
            activity.touch();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(activity.spins() > settled, "did not spin again after a new touch");
        });
    }

    #[test]
    fn a_round_after_new_work_lets_the_runtime_run_before_offering_the_vcpu() {
        let window = Duration::from_millis(500);
        let runtime = current_thread_runtime(window).unwrap();
        let activity = Activity::new();
        runtime.block_on(async {
            spawn_runtime_poller(activity.clone(), window);
            // A touch between every two rounds of this task; the poller runs about as often.
            for _ in 0..40 {
                activity.touch();
                tokio::task::yield_now().await;
            }
            let busy = activity.spins();
            // No new work: the poller's rounds offer the vCPU.
            for _ in 0..40 {
                tokio::task::yield_now().await;
            }
            let quiet = activity.spins() - busy;
            assert!(
                busy <= 4 && quiet >= 20,
                "vCPU offered in {busy} of 40 rounds with new work, {quiet} of 40 without"
            );
        });
    }

    #[test]
    fn a_zero_window_never_spins() {
        let runtime = current_thread_runtime(Duration::ZERO).unwrap();
        let activity = Activity::new();
        runtime.block_on(async {
            spawn_runtime_poller(activity.clone(), Duration::ZERO);
            activity.touch();
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        assert_eq!(activity.spins(), 0);
        assert!(!activity.recent(Duration::ZERO));
    }
}
