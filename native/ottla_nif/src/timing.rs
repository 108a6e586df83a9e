//! How long the NIFs that run on normal schedulers take. Each call records its wall time
//! and the CPU time of its scheduler thread; `nif_timing/0` reports (and resets) the counts.
//! Wall time includes the OS preempting the scheduler thread (frequent on a loaded 2-core
//! machine); CPU time is the NIF's own work. The test suite checks both while consuming.
//!
//! Timing is off until the first `nif_timing/0` call: reading a thread's CPU clock is a system
//! call, which would otherwise cost every ack about as much as the ack itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static CALLS: AtomicU64 = AtomicU64::new(0);
static MAX_WALL_NANOS: AtomicU64 = AtomicU64::new(0);
static MAX_CPU_NANOS: AtomicU64 = AtomicU64::new(0);
static OVER_1MS_WALL: AtomicU64 = AtomicU64::new(0);

fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-parameter; CLOCK_THREAD_CPUTIME_ID exists on Linux and macOS.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Records the time from its creation to its drop (when timing is on).
pub struct Timed(Option<(Instant, u64)>);

impl Timed {
    pub fn start() -> Self {
        Timed(
            ENABLED
                .load(Ordering::Relaxed)
                .then(|| (Instant::now(), thread_cpu_nanos())),
        )
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        let Some((started, cpu_at_start)) = self.0 else {
            return;
        };
        let wall = started.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        let cpu = thread_cpu_nanos().saturating_sub(cpu_at_start);
        CALLS.fetch_add(1, Ordering::Relaxed);
        MAX_WALL_NANOS.fetch_max(wall, Ordering::Relaxed);
        MAX_CPU_NANOS.fetch_max(cpu, Ordering::Relaxed);
        if wall >= 1_000_000 {
            OVER_1MS_WALL.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `{calls, max_wall_us, max_cpu_us, calls_over_1ms_wall}` since the last call; resets them,
/// and turns timing on.
#[rustler::nif]
fn nif_timing() -> (u64, u64, u64, u64) {
    ENABLED.store(true, Ordering::Relaxed);
    (
        CALLS.swap(0, Ordering::Relaxed),
        MAX_WALL_NANOS.swap(0, Ordering::Relaxed) / 1_000,
        MAX_CPU_NANOS.swap(0, Ordering::Relaxed) / 1_000,
        OVER_1MS_WALL.swap(0, Ordering::Relaxed),
    )
}
